"""What a trained workdir is worth: held-out NLL (`eval`), per-token logits (`score`), linear probes of every
layer's features (`probe`) and fine-tuning with the paper's joint loss (`finetune`).
"""

from collections.abc import Sequence
import functools
import io
import json
import math

from absl import flags
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import config as config_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import palette as palette_lib
from pixelgpt import probe as probe_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import storage
from pixelgpt import train
from pixelgpt import workdir as workdir_lib
from pixelgpt.data import pipeline
from pixelgpt.data import sources
from pixelgpt.errors import UserError


def _read_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_read_flags(fv)


def _open_run(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  return cli.open_workdir(fv)


def _split_config(config, split: str, examples: int = 0):
  """The run's config reading `split` in order, as the eval pass does (all of it unless `examples`)."""
  return config_lib.override(config, {"dataset.eval_split": split, "dataset.eval_examples": examples})


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------
def eval_flags(fv):
  _read_flags(fv)


def eval_main(fv):
  run = _open_run(fv)
  with sharding_lib.activate(run.mesh):
    nll = train.evaluate(run.config, run.setup, run.params, run.palette, run.mesh)
  what = "masked-position NLL" if run.config.model.objective == "bert" else "NLL"
  result = {"step": run.step, "split": run.config.dataset.eval_split, "nll_nats_per_token": nll,
            "nll_bits_per_token": nll / math.log(2)}
  if jax.process_index() != 0:
    return
  print(f"pixelgpt eval: step {run.step}, {run.config.dataset.name}/{run.config.dataset.eval_split}: held-out "
        f"{what} {nll:.4f} nats/token = {nll / math.log(2):.4f} bits/token")
  print(json.dumps(result))
  name = metrics_lib.tag(f"{run.config.dataset.name}_{run.config.dataset.eval_split}")
  metrics_lib.add_to_tensorboard(fv.workdir, run.step, "eval", scalars={f"eval/{name}_loss": nll})


# ----------------------------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------------------------
def _padded_batches(arrays: list[np.ndarray], batch: int):
  """Yields (slices of `arrays` padded to `batch` rows by repeating row 0, number of real rows)."""
  n = len(arrays[0])
  for start in range(0, n, batch):
    chunk = [a[start:start + batch] for a in arrays]
    real = len(chunk[0])
    if real < batch:
      chunk = [np.concatenate([c, np.repeat(c[:1], batch - real, axis=0)]) for c in chunk]
    yield chunk, real


def score_tokens(run, tokens: np.ndarray, batch_size: int | None = None):
  """tokens [N, T] -> (logits [N, T, K] float32, nll [N] mean nats/token); position t predicts token t from
  tokens < t (start-of-sequence first). For 'bert' runs nothing is masked: logits of the full context."""
  cfg = run.setup.model.cfg
  if tokens.ndim != 2 or tokens.shape[1] != cfg.seq_len:
    raise UserError(f"tokens must be [N, {cfg.seq_len}] for this model, got {list(tokens.shape)}")
  if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
    raise UserError(f"tokens must lie in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
  batch = batch_size or run.config.batch_size
  sharding = run.setup.batch_sharding["tokens"]

  @jax.jit
  def forward(params, x):
    bert = None if cfg.causal else jnp.zeros(x.shape, bool)
    logits = run.setup.model.apply({"params": params}, x, bert_mask=bert)
    return logits, model_lib.token_nll(logits, x).mean(axis=1)

  rows = sharding_lib.local_rows(sharding, batch)
  logits, nll = [], []
  with sharding_lib.activate(run.mesh):
    for (chunk,), real in _padded_batches([tokens.astype(np.int32)], batch):
      out = forward(run.params, pipeline.to_global({"tokens": chunk[rows]}, sharding, batch)["tokens"])
      # Rows live on every process's devices: each process gets the whole batch (a collective all take part in).
      out = multihost_utils.process_allgather(out, tiled=True)
      logits.append(out[0][:real])
      nll.append(out[1][:real])
  return np.concatenate(logits), np.concatenate(nll)


def score_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_workdir_flag(fv)
  flags.DEFINE_string("tokens", None, "Input .npy of int tokens [N, T].", flag_values=fv)
  flags.DEFINE_string("out", None, "Output .npz with logits [N, T, K] float32 and nll [N].", flag_values=fv)


def score_main(fv):
  tokens_path = storage.usable(fv.tokens, what="--tokens")
  if not tokens_path.exists():
    raise UserError(f"--tokens file not found: {fv.tokens}")
  tokens = np.load(io.BytesIO(tokens_path.read_bytes()), allow_pickle=False)
  run = workdir_lib.open_run(fv.workdir)
  logits, nll = score_tokens(run, tokens)
  if jax.process_index() != 0:
    return
  out = io.BytesIO()
  np.savez(out, logits=logits.astype(np.float32), nll=nll.astype(np.float32))
  storage.write_atomic(storage.usable(fv.out, what="--out"), out.getvalue())
  print(f"pixelgpt score: {len(tokens)} sequences, mean NLL {nll.mean():.4f} nats/token -> {fv.out}")


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------
def feature_pass(run, config, layers: Sequence[int], *, pixels: bool = False, desc: str = "features",
                 indices: Sequence[int] | None = None) -> dict:
  """One forward pass over the eval pass of `config` (a split read in order, or its records `indices`), every
  process decoding its rows.

  Returns global arrays sharded over the batch like the data, never gathered to a host:
  {"features": [G, batches, B, d] — layer l is the mean over positions of ln_1(h_l), layer n_layer the final
  ln_f —, "label": [batches, B], "mask": [batches, B] (0 for padding), and with `pixels` "pixels": [batches, B,
  T·C], the palette colours the model reads}.
  """
  cfg, mesh, batch_size = run.setup.model.cfg, run.mesh, config.batch_size
  sharding = dict(run.setup.batch_sharding, mask=sharding_lib.batch_sharding(mesh))
  num_batches = -(-(pipeline.eval_size(config) if indices is None else len(indices)) // batch_size)
  axes = sharding_lib.BATCH_AXES
  shapes = {"features": ((len(layers), num_batches, batch_size, cfg.d_model), P(None, None, axes, None)),
            "label": ((num_batches, batch_size), P(None, axes)), "mask": ((num_batches, batch_size), P(None, axes))}
  if pixels:
    width = cfg.seq_len * config.dataset.channels
    shapes["pixels"] = ((num_batches, batch_size, width), P(None, axes, None))
  # Hashable layouts: the jitted functions below compile once per model, layers and shapes, not once per pass.
  layout = tuple((k, shape, NamedSharding(mesh, spec)) for k, (shape, spec) in shapes.items())
  centers = jnp.asarray(run.palette, jnp.float32)
  buffers = _zero_buffers(layout)
  rows = sharding_lib.local_rows(sharding["tokens"], batch_size)
  with sharding_lib.activate(mesh):
    batches = pipeline.make_eval_batches(config, run.palette, rows=rows, indices=indices)
    for i, host in enumerate(tqdm(batches, total=num_batches, desc=desc, unit="batch", leave=False,
                                  disable=jax.process_index() != 0)):
      batch = pipeline.to_global(host, sharding, batch_size)
      buffers = _put_features(buffers, run.params, batch, i, centers, model=run.setup.model, layers=tuple(layers),
                              layout=layout)
  return buffers


@functools.partial(jax.jit, static_argnames=("layout",))
def _zero_buffers(layout):
  return {k: jax.lax.with_sharding_constraint(jnp.zeros(shape, jnp.int32 if k == "label" else jnp.float32), where)
          for k, shape, where in layout}


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("model", "layers", "layout"))
def _put_features(buffers, params, batch, i, centers, *, model, layers, layout):
  """Writes batch i's features (and labels, mask, pixels if the layout has them) into the pass's buffers."""
  tokens = batch["tokens"]
  bert = None if model.cfg.causal else jnp.zeros(tokens.shape, bool)
  features = model.apply({"params": params}, tokens, bert_mask=bert, return_features=True)[1]
  new = {"features": features[jnp.asarray(layers)], "label": batch["label"], "mask": batch["mask"]}
  if "pixels" in buffers:
    new["pixels"] = centers[tokens].reshape(tokens.shape[0], -1)
  # Batch i goes to index i of the unsharded batches axis: each device writes its own rows, in place.
  return {k: jax.lax.with_sharding_constraint(
      jax.lax.dynamic_update_index_in_dim(buffers[k], new[k].astype(buffers[k].dtype), i,
                                          axis=1 if k == "features" else 0), where) for k, _, where in layout}


@jax.jit
def _feature_rms(x, mask):
  """Root mean square of the real rows' features: a cheap fingerprint that tests compare across meshes."""
  return jnp.sqrt(jnp.sum(mask[..., None] * x * x) / (jnp.sum(mask) * x.shape[-1]))


def layers_per_pass(run, num_examples: int, batch_size: int, num_layers: int, memory_gib: float) -> int:
  """How many layers' features of `num_examples` fit `memory_gib` per device: each pass over the data holds
  G × N × d float32 (N padded to whole batches) spread over the data-parallel devices (replicated over tensor)."""
  shards = math.prod(run.mesh.shape[a] for a in sharding_lib.BATCH_AXES)
  per_layer = -(-num_examples // batch_size) * batch_size // shards * run.setup.model.cfg.d_model * 4
  return max(1, min(num_layers, int(memory_gib * 2 ** 30 // per_layer)))


def probe_flags(fv):
  _read_flags(fv)
  flags.DEFINE_integer("train_examples", 0, "Probe on the first N training examples (0: all).", flag_values=fv)
  flags.DEFINE_integer("test_examples", 0, "Evaluate on the first N test examples (0: all).", flag_values=fv)
  flags.DEFINE_list("layers", None, "Layers to probe, 0..n_layer (default: all).", flag_values=fv)
  flags.DEFINE_float("val_fraction", probe_lib.VAL_FRACTION, "Share of the probed training examples held out to "
                     "choose the layer and the L2 strength.", flag_values=fv)
  flags.DEFINE_float("feature_memory_gib", 4.0, "Features held per device at once: the layers of one pass over "
                     "the training split; more layers take more passes.", flag_values=fv)


def probe_main(fv):
  run = _open_run(fv)
  layers = None
  if fv.layers:
    try:
      layers = [int(layer) for layer in fv.layers]
    except ValueError:
      raise UserError(f"--layers takes layer numbers, got {','.join(fv.layers)}") from None
  result = linear_probe(run, fv.workdir, train_examples=fv.train_examples, test_examples=fv.test_examples,
                        layers=layers, val_fraction=fv.val_fraction, feature_memory_gib=fv.feature_memory_gib)
  if jax.process_index() != 0:
    return
  print(f"pixelgpt probe: {result['dataset']} ({result['train_examples'] - result['val_examples']} fit / "
        f"{result['val_examples']} validation / {result['test_examples']} test), step {run.step}")
  print(f"{'layer':>8} {'val acc':>8}")
  for row in result["layers"]:
    mark = f"  <- chosen: test accuracy {100 * result['test_accuracy']:.2f}%" if row["layer"] == \
        result["best_layer"] else ""
    print(f"{row['layer']:>8} {100 * row['val_accuracy']:7.2f}%{mark}")
  px = result["pixels"]
  print(f"{'pixels':>8} {100 * px['val_accuracy']:7.2f}%  (baseline: test accuracy {100 * px['test_accuracy']:.2f}%)")
  w = storage.path(fv.workdir)
  print(f"-> {w / 'probe.json'}, {w / 'probe.png'}")
  name = metrics_lib.tag(result["dataset"])
  metrics_lib.add_to_tensorboard(fv.workdir, run.step, "probe", scalars={
      **{f"probe/{name}_layer_{row['layer']}_val_accuracy": row["val_accuracy"] for row in result["layers"]},
      f"probe/{name}_test_accuracy": result["test_accuracy"], f"probe/{name}_best_layer": result["best_layer"],
      f"probe/{name}_pixels_test_accuracy": px["test_accuracy"]})


def linear_probe(run, workdir, *, train_examples: int = 0, test_examples: int = 0, layers=None,
                 val_fraction: float = probe_lib.VAL_FRACTION, feature_memory_gib: float = 4.0) -> dict:
  """The paper's linear probe, selected honestly; writes W/probe.json and the accuracy-by-depth plot W/probe.png.

  Every layer's L2 strength and the layer itself are chosen on a seeded `val_fraction` of the training examples;
  the test split is read once, for the chosen layer (and the pixel baseline, chosen the same way). Layer l
  (0-based) is the mean over positions of ln_1(h_l), the normed input of block l; layer n_layer is the final ln_f.
  Features stay on the devices, sharded over the batch; one pass over the training split holds as many layers
  as `feature_memory_gib` allows per device.
  """
  d, n_layer = run.config.dataset, run.setup.model.cfg.n_layer
  layers = list(range(n_layer + 1)) if layers is None else list(layers)
  if not layers or any(not 0 <= layer <= n_layer for layer in layers) or len(set(layers)) != len(layers):
    raise UserError(f"--layers must name distinct layers between 0 and {n_layer} (the final ln_f), got {layers}")
  if not 0 < val_fraction < 1:
    raise UserError(f"--val_fraction must be in (0, 1), got {val_fraction}")
  train_config = _split_config(run.config, d.train_split, train_examples)
  test_config = _split_config(run.config, d.eval_split, test_examples)
  # Counted once: each count opens the split (a whole folder listing, or an array file read).
  train_indices = range(pipeline.eval_size(train_config))
  n_train = len(train_indices)
  held = probe_lib.validation_carve(n_train, val_fraction, run.config.seed)
  per_pass = layers_per_pass(run, n_train, train_config.batch_size, len(layers), feature_memory_gib)

  rows, pixels, num_classes = [], None, None
  with sharding_lib.activate(run.mesh):
    for start in range(0, len(layers), per_pass):
      group = layers[start:start + per_pass]
      data = feature_pass(run, train_config, group, pixels=pixels is None, desc=f"train features {group}",
                          indices=train_indices)
      if num_classes is None:
        num_classes = 1 + int(jnp.max(data["label"]).addressable_data(0))
        carve = np.zeros(data["mask"].shape, bool)
        carve.reshape(-1)[:n_train] = held
        val = jax.device_put(carve, data["mask"].sharding)
        fit_weights, val_weights = data["mask"] * ~val, data["mask"] * val
        pixels = probe_lib.select_and_fit(data["pixels"], data["label"], fit_weights, val_weights,
                                          num_classes=num_classes)
      for g, layer in enumerate(group):
        x = data["features"][g]
        chosen = probe_lib.select_and_fit(x, data["label"], fit_weights, val_weights, num_classes=num_classes)
        rms = float(_feature_rms(x, data["mask"]).addressable_data(0))
        rows.append({"layer": layer, **chosen, "feature_rms": rms})
      del data
    # Ties go to the shallower layer: the cheaper feature.
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["layer"]))
    test = feature_pass(run, test_config, [best["layer"]], pixels=True, desc=f"test features [{best['layer']}]")
    test_accuracy = probe_lib.accuracy(best["w"], best["b"], test["features"][0], test["label"], test["mask"])
    pixels_test = probe_lib.accuracy(pixels["w"], pixels["b"], test["pixels"], test["label"], test["mask"])
    n_test = int(jnp.sum(test["mask"]).addressable_data(0))

  strip = lambda r: {k: v for k, v in r.items() if k not in ("w", "b")}
  result = {"dataset": d.name, "train_split": d.train_split, "test_split": d.eval_split, "step": run.step,
            "train_examples": n_train, "val_examples": int(held.sum()), "test_examples": n_test,
            "selection": f"layer and L2 by accuracy on a seeded {val_fraction:g} of the training examples; test "
                         "read once, for the chosen layer",
            "layers": [strip(r) for r in sorted(rows, key=lambda r: r["layer"])],
            "best_layer": best["layer"], "test_accuracy": test_accuracy,
            "pixels": {**strip(pixels), "test_accuracy": pixels_test}}
  if jax.process_index() == 0:
    w = storage.path(workdir)
    storage.write_atomic(w / "probe.json", json.dumps(result, indent=2))
    probe_lib.plot_accuracy_by_layer(result["layers"], pixels["val_accuracy"],
                                     {"layer": best["layer"], "test_accuracy": test_accuracy}, w / "probe.png",
                                     f"linear probe: {d.name}, step {run.step}")
  return result


# ----------------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------------
def finetune_flags(fv):
  _read_flags(fv)
  flags.DEFINE_string("out", None, "Workdir of the fine-tuned run.", flag_values=fv)
  flags.DEFINE_integer("steps", 500, "Fine-tuning steps.", flag_values=fv)
  flags.DEFINE_float("lr", 0.0, "Peak learning rate (0: the pretraining lr).", flag_values=fv)


def finetune_main(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  result = finetune(fv.workdir, fv.out, steps=fv.steps, lr=fv.lr, overrides=cli.config_overrides(fv))
  if jax.process_index() != 0:
    return
  print(f"pixelgpt finetune: {result['steps']} steps, test accuracy {100 * result['test_accuracy']:.2f}% "
        f"on {result['test_examples']} examples -> {storage.path(fv.out) / 'finetune.json'}")


def _num_classes(config, scan: int = 5000) -> int:
  """1 + the largest label among the first `scan` training records (a source knows no class list)."""
  source = sources.get_source(config.dataset, config.dataset.train_split)
  return 1 + max(int(source[i]["label"]) for i in range(min(scan, len(source))))


def _classify(model, params, tokens, bert_mask=None):
  """(generative logits [B, T, K], class logits [B, C]) from the mean-pooled ln_f output, as in the paper; a
  'bert' model sees `bert_mask` (default: nothing masked)."""
  if not model.cfg.causal and bert_mask is None:
    bert_mask = jnp.zeros(tokens.shape, bool)
  logits, features = model.apply({"params": params["model"]}, tokens, bert_mask=bert_mask, return_features=True)
  pooled = features[-1]
  return logits, pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def finetune_loss(model, params, batch, rng, mask_prob: float):
  """L = L_gen + L_clf, returned with (L_gen, L_clf). L_gen is pretraining's objective: every position's NLL for
  'ar'; for 'bert' the tokens are masked with `mask_prob` (drawn from rng) and L_gen is the masked positions' NLL,
  so fine-tuning never trains on predicting tokens the model can see."""
  tokens = batch["tokens"]
  masked = None if model.cfg.causal else model_lib.bert_mask(rng, tokens.shape, mask_prob)
  logits, class_logits = _classify(model, params, tokens, masked)
  nll = model_lib.token_nll(logits, tokens)
  generative = nll.mean() if masked is None else jnp.sum(nll * masked) / jnp.maximum(jnp.sum(masked), 1.0)
  classification = optax.softmax_cross_entropy_with_integer_labels(class_logits, batch["label"]).mean()
  return generative + classification, (generative, classification)


def finetune(workdir, out, *, steps: int, lr: float = 0.0, overrides: dict | None = None) -> dict:
  """Fine-tunes all weights plus a linear classifier with L = L_gen + L_clf; checkpoints and finetune.json in
  `out`. The classifier starts at zero, so step 0 is exactly the pretrained generative model."""
  if steps <= 0:
    raise UserError(f"--steps must be positive, got {steps}")
  run = workdir_lib.open_run(workdir, overrides=overrides)
  config = config_lib.override(run.config, {"total_steps": steps, "optim.warmup_steps": max(1, steps // 10),
                                            "optim.lr": lr or run.config.optim.lr})
  config_lib.validate(config)
  num_classes = _num_classes(config)
  model, mesh = run.setup.model, run.mesh
  d = model.cfg.d_model
  params = {"model": run.params,
            "classifier": {"kernel": jnp.zeros((d, num_classes)), "bias": jnp.zeros((num_classes,))}}
  tx = train.make_optimizer(config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  @jax.jit
  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    loss_fn = functools.partial(finetune_loss, model, batch=batch, rng=rng, mask_prob=config.model.bert_mask_prob)
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return train.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), parts

  out = storage.usable(out, what="--out")
  rows = sharding_lib.local_rows(run.setup.batch_sharding["tokens"], config.batch_size)
  data = pipeline.make_train_iterator(config, run.palette, rows=rows)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1)
  config_json = config_lib.to_json(config)
  log = []
  with sharding_lib.activate(mesh):
    for i in tqdm(range(1, steps + 1), desc="finetune", unit="step", disable=jax.process_index() != 0):
      batch = pipeline.to_global(next(data), run.setup.batch_sharding, config.batch_size)
      state, (generative, classification) = step_fn(state, batch)
      if i % max(1, steps // 10) == 0 or i == steps:
        log.append({"step": i, "loss/gen": float(generative), "loss/clf": float(classification)})
    checkpointer.save(steps, state, data, config_json=config_json, palette=run.palette)
    checkpointer.close()

    # Counted on the mesh (each process holds only its rows' labels): the sums come back replicated.
    counts = jax.jit(lambda p, b: (jnp.sum((jnp.argmax(_classify(model, p, b["tokens"])[1], axis=-1) == b["label"])
                                           * b["mask"]), jnp.sum(b["mask"])))
    sharding = dict(run.setup.batch_sharding, mask=sharding_lib.batch_sharding(mesh))
    correct = total = 0
    test_config = _split_config(config, config.dataset.eval_split)
    for host in pipeline.make_eval_batches(test_config, run.palette, rows=rows):
      right, real = counts(state.params, pipeline.to_global(host, sharding, config.batch_size))
      correct, total = correct + int(right), total + int(real)
  result = {"pretrained_workdir": str(storage.path(workdir)), "pretrained_step": run.step, "steps": steps,
            "lr": config.optim.lr, "test_accuracy": correct / max(total, 1), "test_examples": total, "log": log}
  if jax.process_index() == 0:
    palette_lib.save(out / "palette.npy", run.palette)
    storage.write_atomic(out / "config.json", config_json)
    storage.write_atomic(out / "finetune.json", json.dumps(result, indent=2))
  return result
