"""The trainer, read top to bottom: setup -> mesh -> palette -> input -> model and optimizer -> sharded init ->
update step -> checkpoint restore -> evals -> loop.

`make_train_step` builds the one train step; the loop below jits it with explicit shardings, and compile.py
lowers exactly the same function for TPU topologies ahead of time.
"""

import dataclasses
import functools
import signal
import sys
import time
from typing import Any

from absl import flags
import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import config as config_lib
from pixelgpt import goodput
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import palette as palette_lib
from pixelgpt import profile as profile_lib
from pixelgpt import sample as sample_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import storage
from pixelgpt.data import pipeline
from pixelgpt.errors import Diverged, UserError

# A log interval whose steps waited longer than this share of their time for input gets a warning.
DATA_WAIT_WARNING = 0.05
# Keys that fix the shapes of the parameters and the palette: a workdir cannot resume under other values.
SHAPE_KEYS = ("dataset.resolution", "dataset.channels", "palette.size", "model.n_layer", "model.d_model",
              "model.n_head", "model.mlp_ratio", "model.use_bias", "model.scan_layers")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer, loss and the update step: pure functions over pytrees.
# ----------------------------------------------------------------------------------------------------------------
def lr_schedule(config):
  warmup = min(config.optim.warmup_steps, config.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, config.optim.lr, warmup, config.total_steps, end_value=0.0)


def make_optimizer(config):
  o = config.optim
  adam = optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam) if o.grad_clip > 0 else adam


def nll_sums(model, params, batch, rng, mask_prob: float):
  """(sum of per-token NLL in nats, number of scored tokens) over a batch; rows with mask 0 are padding.

  'ar' scores every position; 'bert' draws a mask from rng and scores only the masked positions.
  """
  tokens = batch["tokens"]
  weights = jnp.broadcast_to(batch["mask"][:, None], tokens.shape) if "mask" in batch else jnp.ones(tokens.shape)
  if model.cfg.causal:
    logits = model.apply({"params": params}, tokens)
  else:
    masked = model_lib.bert_mask(rng, tokens.shape, mask_prob)
    logits = model.apply({"params": params}, tokens, bert_mask=masked)
    weights = weights * masked
  nll = model_lib.token_nll(logits, tokens)
  return jnp.sum(nll * weights), jnp.sum(weights)


def make_init_fn(model, tx, seq_len: int):
  def init(rng) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    bert = None if model.cfg.causal else jnp.zeros((1, seq_len), bool)
    params = model.init(rng, tokens, bert_mask=bert)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def make_train_step(model, tx, config):
  schedule = lr_schedule(config)
  seed, mask_prob, skip_nonfinite = config.seed, config.model.bert_mask_prob, config.optim.skip_nonfinite

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      total, count = nll_sums(model, params, batch, rng, mask_prob)
      return total / jnp.maximum(count, 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:  # keep the old weights and moments; the batch is still consumed
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                       (state.params, state.opt_state))
    metrics = {"train/loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# XLA:CPU hands dots (only) to YNNPACK: with jaxlib's default library fusions, which also take elementwise ops,
# the MLP's backward fed its weight-gradient dots through transposed copies (27% of the Fashion-MNIST step's op
# time in `pixelgpt profile`). Interleaved in one process on the 2-core AMD EPYC, the benchmark 'small' step (4 x
# 256, T=1024, batch 8, f32): 2.50 -> 2.20 s unrolled, 2.72 -> 2.37 s scanned (benchmarks/train_throughput.py).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _cpu_options_known() -> bool:
  """Whether this jaxlib takes CPU_COMPILER_OPTIONS (an experimental option: a later XLA may rename it)."""
  try:
    jax.jit(lambda x: x @ x, compiler_options=CPU_COMPILER_OPTIONS).lower(
        jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()
    return True
  except Exception:  # pylint: disable=broad-except  (XLA's INVALID_ARGUMENT for an unknown option or value)
    return False


def compiler_options(mesh, dtype: str = "float32") -> dict | None:
  """XLA options for the train step on this mesh's backend: CPU_COMPILER_OPTIONS for f32 models on CPU, where known.
  Not for bf16: dots-only fusions run bf16 x bf16 -> f32 dots in f32 between converts (model._bf16_dot's
  native form), and the default fusions were faster there: 2.47 -> 1.64 s for the benchmark bf16 step."""
  cpu = mesh.devices.flat[0].platform == "cpu"
  return CPU_COMPILER_OPTIONS if cpu and dtype == "float32" and _cpu_options_known() else None


@dataclasses.dataclass
class Setup:
  """Everything about a run that follows from its config and mesh, shared by train, compile and eval."""
  model: model_lib.Transformer
  tx: Any
  abstract_state: Any  # unboxed ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: Any
  init: Any  # jitted rng -> TrainState, sharded at birth
  train_step: Any  # jitted, state donated
  eval_sums: Any  # jitted (params, batch, rng) -> (sum of NLL, scored tokens)
  sample: Any  # jitted (params, rng, prefix) -> tokens


def setup(config, mesh) -> Setup:
  model = model_lib.Transformer(model_lib.ModelConfig.from_config(config))
  tx = make_optimizer(config)
  init = make_init_fn(model, tx, config_lib.seq_len(config))
  boxed = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding_lib.logical_sharding(boxed, mesh)
  abstract_state = ckpt_lib.abstract_with_shardings(nn.meta.unbox(boxed), state_shardings)
  batch_sharding = {"tokens": sharding_lib.batch_sharding(mesh), "label": sharding_lib.batch_sharding(mesh)}
  step = make_train_step(model, tx, config)
  return Setup(
      model=model, tx=tx, abstract_state=abstract_state, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=state_shardings),
      train_step=jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, sharding_lib.replicated(mesh)), donate_argnums=0,
                         compiler_options=compiler_options(mesh, config.model.dtype)),
      eval_sums=jax.jit(lambda p, b, r: nll_sums(model, p, b, r, config.model.bert_mask_prob)),
      sample=jax.jit(lambda p, r, x: sample_lib.sample(model, p, r, x)))


def abstract_batch(config, s: Setup):
  shape = (config.batch_size,)
  return {"tokens": jax.ShapeDtypeStruct(shape + (config_lib.seq_len(config),), jnp.int32,
                                         sharding=s.batch_sharding["tokens"]),
          "label": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s.batch_sharding["label"])}


# ----------------------------------------------------------------------------------------------------------------
# Workdir helpers.
# ----------------------------------------------------------------------------------------------------------------
def _check_same_shapes(config, workdir):
  path = workdir / "config.json"
  if not path.exists():
    return
  old = config_lib.from_json(path.read_text())
  for key in SHAPE_KEYS:
    a, b = config_lib.get(old, key, None), config_lib.get(config, key, None)
    if a != b:
      raise UserError(f"{workdir} holds a run with {key}={a!r}, but the config says {b!r}: use another --workdir")


def load_or_fit_palette(config, workdir, *, write: bool) -> np.ndarray:
  """The workdir's palette if it has one (resume), else config.palette.path, else k-means on training pixels."""
  k, c = config.palette.size, config.dataset.channels
  path = workdir / "palette.npy"
  if path.exists():
    return palette_lib.load(path, expect_k=k, expect_c=c)
  if config.palette.path:
    centers = palette_lib.load(config.palette.path, expect_k=k, expect_c=c)
  else:
    pixels = pipeline.sample_pixels(config, config.palette.fit_pixels, config.seed)
    centers = palette_lib.fit(pixels, k, config.seed)
  if write:
    palette_lib.save(path, centers)
  return centers


class PreemptionGuard:
  """SIGTERM (Cloud TPU maintenance, spot preemption) asks the loop to finish its step, checkpoint and exit 0.

  With several processes, JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM on
  whichever process receives it and propagates the notice; its sync point then names one step, the same on every
  process, at which all save, with no collective of ours per step. (A Python handler would replace the service's
  own, so none is installed then.)
  """

  def __init__(self):
    self._flag = False
    self._service = jax.process_count() > 1
    self._previous = None if self._service else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    """Whether to save at `step` and stop; call it at every step (the sync point must see each one)."""
    return multihost_utils.reached_preemption_sync_point(step) if self._service else self._flag

  def release(self):
    if not self._service:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(fetched, *, skip: bool, writer, last_checkpoint) -> int:
  """Raises Diverged at the first non-finite step (or, when skipping, reports and counts them)."""
  bad = [(step, m) for step, m in fetched if not m["finite"]]
  if bad and not skip:
    step, m = bad[0]
    raise Diverged(f"training diverged at step {step}: train/loss {float(m['train/loss'])}, grad_norm "
                   f"{float(m['grad_norm'])}; nothing after step {last_checkpoint} was saved. Lower optim.lr, or "
                   f"set --config.optim.skip_nonfinite=True to skip such updates")
  for step, m in bad:
    writer.message(f"pixelgpt: step {step}: non-finite loss or gradient, update skipped")
  return len(bad)


def _interval_means(interval: list[dict]) -> dict:
  finite = [m for m in interval if m["finite"]] or interval
  return {"train/loss": float(np.mean([m["train/loss"] for m in finite])),
          "grad_norm": float(np.mean([m["grad_norm"] for m in finite])),
          "lr": float(interval[-1]["lr"])}


def evaluate(config, s: Setup, params, palette, mesh) -> float:
  """Held-out NLL in nats/token over one deterministic pass of the eval split."""
  sharding = dict(s.batch_sharding, mask=sharding_lib.batch_sharding(mesh))
  total, count = 0.0, 0.0
  rows = sharding_lib.local_rows(sharding["tokens"], config.batch_size)
  for i, host_batch in enumerate(pipeline.make_eval_batches(config, palette, rows=rows)):
    batch = pipeline.to_global(host_batch, sharding, config.batch_size)
    t, c = s.eval_sums(params, batch, jax.random.fold_in(jax.random.key(config.seed + 1), i))
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def _fewshot(evaluator, config, s: Setup, params, palette, mesh, step: int) -> dict:
  """The few-shot metrics at this step, and the seconds they took (perf/fewshot_s: their share of the run)."""
  from pixelgpt import workdir as workdir_lib  # pylint: disable=g-import-not-at-top  (workdir imports train)
  start = time.perf_counter()
  metrics = evaluator(workdir_lib.Run(config=config, palette=palette, params=params, setup=s, mesh=mesh, step=step))
  return {**metrics, "perf/fewshot_s": time.perf_counter() - start}


def write_samples(config, s: Setup, params, palette, workdir, step: int, num: int = 16):
  """Writes W/samples/step_<step>.png on process 0; returns (its path, the grid) there, else None."""
  if not s.model.cfg.causal:
    return None  # the bert objective does not define left-to-right samples
  prefix = jnp.zeros((num, config_lib.seq_len(config)), jnp.int32)
  # Every process runs the sampler (its devices hold part of the batch); process 0 gathers and writes.
  tokens = multihost_utils.process_allgather(s.sample(params, jax.random.key(config.seed), prefix), tiled=True)
  if jax.process_index() != 0:
    return None
  images = sample_lib.tokens_to_images(np.asarray(tokens), palette, config.dataset.resolution)
  path = workdir / "samples" / f"step_{step:06d}.png"
  return path, sample_lib.save_grid(images, path, columns=int(np.ceil(np.sqrt(num))))


# ----------------------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------------------
def run(config, workdir, *, stop_after: int | None = None, devices=None, started: float | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics. `stop_after` ends the session
  early at that step with a checkpoint, as a preemption would (tests use it for exact-resume checks). `started`
  (time.time() when the process started; default now) is where the session's goodput clock starts."""
  # --- Setup -------------------------------------------------------------------------------------------------
  config_lib.validate(config)
  workdir = storage.usable(workdir, what="--workdir")
  is_main = jax.process_index() == 0
  clock = goodput.Recorder(workdir, started=time.time() if started is None else started, enabled=is_main)
  _check_same_shapes(config, workdir)
  config_json = config_lib.to_json(config)

  # --- Mesh --------------------------------------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  sharding_lib.check_batch(config.batch_size, mesh)

  # --- Palette and input -------------------------------------------------------------------------------------
  palette = load_or_fit_palette(config, workdir, write=is_main)
  if is_main:
    storage.write_atomic(workdir / "config.json", config_json)
  # This process decodes only the rows of each global batch that its devices hold.
  rows = sharding_lib.local_rows(sharding_lib.batch_sharding(mesh), config.batch_size)
  data = pipeline.make_train_iterator(config, palette, rows=rows)

  # --- Model, optimizer, sharded init ------------------------------------------------------------------------
  s = setup(config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  # --- Checkpoint restore: the newest intact one, onto this mesh; the data iterator to where it stopped ------
  with clock.time("restore"):
    latest, state = checkpointer.restore_latest_good(
        s.abstract_state, data, report=lambda m: print(m, file=sys.stderr) if is_main else None)
  if latest is None:
    state = s.init(jax.random.key(config.seed))
    start = 0
  else:
    start = latest

  fewshot_eval = None
  if config.fewshot.layers:
    from pixelgpt import fewshot  # pylint: disable=g-import-not-at-top  (it reads features through evaluate.py)
    fewshot_eval = fewshot.Evaluator(config)

  peak = metrics_lib.peak_flops_per_device()  # measured on a CPU: outside the mesh context, on one device
  with sharding_lib.activate(mesh):
    model_cfg = s.model.cfg
    writer = metrics_lib.MetricWriter(workdir, total_steps=config.total_steps, initial_step=start, enabled=is_main)
    writer.message(f"pixelgpt: {model_lib.count_params(state.params) / 1e6:.2f}M parameters, mesh "
                   f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
                   + ("starting from scratch" if latest is None else f"resuming from step {start}") + f" in {workdir}")
    end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
    if start >= end:
      writer.message(f"pixelgpt: {workdir} is already trained to step {start}; nothing to do")
      writer.close()
      checkpointer.close()
      return {}

    # Compile ahead of the loop so that step timings never include compilation.
    with clock.time("compile"):
      train_step = s.train_step.lower(state, abstract_batch(config, s)).compile()
    writer.message(f"pixelgpt: train step compiled in {clock.seconds['compile']:.1f}s")
    tokens_per_step = config.batch_size * model_cfg.seq_len
    tracer = profile_lib.Tracer(config, workdir, start_step=start, end_step=end)

    # --- Loop --------------------------------------------------------------------------------------------------
    # Metrics stay on device until a log or checkpoint step; then one host sync checks that every step since the
    # last check was finite, so a diverged state is never logged as fine nor saved.
    guard = PreemptionGuard()
    last, pending, interval, interval_start, skipped = {}, [], [], time.perf_counter(), 0
    wait_warned, ending = False, "error"
    clock.begin(start)
    clock.record(start)
    interval_wait = clock.seconds["data_wait"]
    try:
      for step in range(start + 1, end + 1):
        tracer.before(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          with clock.time("data_wait"), jax.profiler.TraceAnnotation(profile_lib.DATA_WAIT):
            batch = pipeline.to_global(next(data), s.batch_sharding, config.batch_size)
          with clock.time("train"):
            state, step_metrics = train_step(state, batch)
        if tracer.stopping(step):
          with clock.time("train"):
            jax.block_until_ready(state)
          copy_start = time.perf_counter()
          traced = tracer.stop(train_step)
          interval_start += time.perf_counter() - copy_start  # the trace's copy is not a step's time
          writer.message(f"pixelgpt: profile of steps {tracer.first}-{tracer.last} -> {traced} "
                         f"(`pixelgpt profile --workdir {workdir}`)")
        pending.append((step, step_metrics))
        writer.advance()
        logging = step % config.log_every == 0 or step == end
        preempted = guard.requested(step)
        saving = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end or preempted
        if logging or saving:
          with clock.time("train"):  # where the host waits for the device to finish the steps
            fetched = jax.device_get(pending)
          paused = time.perf_counter()
          pending = []
          skipped += _check_finite(fetched, skip=config.optim.skip_nonfinite, writer=writer,
                                   last_checkpoint=checkpointer.latest_step())
          interval.extend(m for _, m in fetched)
        if logging:
          now = time.perf_counter()
          last = _interval_means(interval)
          step_time = (now - interval_start) / len(interval)
          last.update(metrics_lib.perf_metrics(step_time, tokens_per_step, model_cfg, jax.device_count(), peak))
          last["perf/data_wait_s"] = (clock.seconds["data_wait"] - interval_wait) / len(interval)
          # The session's first interval holds the pipeline's start-up: judged from the second on.
          if (not wait_warned and step - start > len(interval)
              and last["perf/data_wait_s"] > DATA_WAIT_WARNING * step_time):
            wait_warned = True
            writer.message(
                f"pixelgpt: warning: step {step}: each step waited {1e3 * last['perf/data_wait_s']:.1f} ms of "
                f"{1e3 * step_time:.1f} ms ({100 * last['perf/data_wait_s'] / step_time:.0f}%) for input; raise "
                f"--config.dataset.worker_count (now {config.dataset.worker_count}) or read from faster storage")
          if config.optim.skip_nonfinite:
            last["train/skipped_steps"] = skipped
          interval, interval_wait = [], clock.seconds["data_wait"]
          evaluating = (config.eval_every and step % config.eval_every == 0) or step == config.total_steps
          with clock.time("eval"):
            if evaluating:
              last["eval/loss"] = evaluate(config, s, state.params, palette, mesh)
            shots = fewshot_eval and (evaluating if not config.fewshot.every else step % config.fewshot.every == 0
                                      or step == config.total_steps)
            if shots:
              last.update(_fewshot(fewshot_eval, config, s, state.params, palette, mesh, step))
          last.update(goodput.metrics(clock.totals(step)))
          writer.write(step, last)
          if shots and is_main:  # the curves so far, restarts included, as one picture beside TensorBoard's
            fewshot.plot_curves(metrics_lib.read_metrics(workdir), workdir / "fewshot.png",
                                f"few-shot linear accuracy on {config.dataset.name}")
        if saving:
          with clock.time("checkpoint"):
            checkpointer.save(step, state, data, config_json=config_json, palette=palette)
          clock.mark(step)
          writer.seal(step)
        if logging or saving:
          clock.record(step)
          # What followed the steps (evaluations, writes, the save) is no step's time.
          interval_start = time.perf_counter() if logging else interval_start + time.perf_counter() - paused
        if preempted:
          with clock.time("checkpoint"):
            checkpointer.wait()
          writer.message(f"pixelgpt: SIGTERM: saved a checkpoint at step {step} in {checkpointer.directory}; "
                         f"rerun the same command to resume")
          end = step
          ending = "preempted (SIGTERM)"
          break
        if (config.sample_every and step % config.sample_every == 0) or step == config.total_steps:
          with clock.time("sample"):
            written = write_samples(config, s, state.params, palette, workdir, step)
          if written:
            writer.image(step, "samples", written[1])
            writer.message(f"pixelgpt: samples at step {step} -> {written[0]}")
          interval_start = time.perf_counter()
      else:
        ending = "finished" if end == config.total_steps else f"stopped at step {end}"
    except Diverged:
      ending = "diverged"
      raise
    finally:
      guard.release()
      with clock.time("checkpoint"):
        checkpointer.close()  # also on divergence: the earlier, good checkpoint still finishes writing
      writer.close()
      clock.record(clock.session.step if ending in ("error", "diverged") else end, end=ending)
  if is_main:
    print(f"pixelgpt: step {end}: train/loss {last.get('train/loss', float('nan')):.4f}"
          + (f", eval/loss {last['eval/loss']:.4f}" if "eval/loss" in last else "")
          + f"; metrics in {workdir / 'metrics.jsonl'}, TensorBoard in {workdir / 'tb'}, "
          f"samples in {workdir / 'samples'}, checkpoints in {workdir / 'checkpoints'}")
  return last


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt train`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_config_flag(fv)
  flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, samples.", flag_values=fv)


def main(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  run(fv.config, fv.workdir, started=cli.STARTED)
