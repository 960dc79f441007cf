"""What a trained workdir is worth: held-out NLL (`eval`), per-token logits (`score`), linear probes of every
layer's features (`probe`) and fine-tuning with the paper's joint loss (`finetune`).
"""

import io
import json
import math

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import config as config_lib
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


def _workdir_flag(fv):
  flags.DEFINE_string("workdir", None, "A trained (or converted) pixelgpt workdir.", flag_values=fv)


def _require_workdir(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.require(fv, "workdir")


def _split_config(config, split: str, examples: int = 0):
  """The run's config reading `split` in order, as the eval pass does (all of it unless `examples`)."""
  return config_lib.override(config, {"dataset.eval_split": split, "dataset.eval_examples": examples})


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------
def eval_flags(fv):
  _workdir_flag(fv)


def eval_main(fv):
  _require_workdir(fv)
  run = workdir_lib.open_run(fv.workdir)
  with sharding_lib.activate(run.mesh):
    nll = train.evaluate(run.config, run.setup, run.params, run.palette, run.mesh)
  what = "masked-position NLL" if run.config.model.objective == "bert" else "NLL"
  result = {"step": run.step, "split": run.config.dataset.eval_split, "nll_nats_per_token": nll,
            "nll_bits_per_token": nll / math.log(2)}
  print(f"pixelgpt eval: step {run.step}, {run.config.dataset.name}/{run.config.dataset.eval_split}: held-out "
        f"{what} {nll:.4f} nats/token = {nll / math.log(2):.4f} bits/token")
  print(json.dumps(result))


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
      logits.append(np.asarray(out[0])[:real])
      nll.append(np.asarray(out[1])[:real])
  return np.concatenate(logits), np.concatenate(nll)


def score_flags(fv):
  _workdir_flag(fv)
  flags.DEFINE_string("tokens", None, "Input .npy of int tokens [N, T].", flag_values=fv)
  flags.DEFINE_string("out", None, "Output .npz with logits [N, T, K] float32 and nll [N].", flag_values=fv)


def score_main(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.require(fv, "workdir", "tokens", "out")
  tokens_path = storage.usable(fv.tokens, what="--tokens")
  if not tokens_path.exists():
    raise UserError(f"--tokens file not found: {fv.tokens}")
  tokens = np.load(io.BytesIO(tokens_path.read_bytes()), allow_pickle=False)
  run = workdir_lib.open_run(fv.workdir)
  logits, nll = score_tokens(run, tokens)
  out = io.BytesIO()
  np.savez(out, logits=logits.astype(np.float32), nll=nll.astype(np.float32))
  storage.write_atomic(storage.usable(fv.out, what="--out"), out.getvalue())
  print(f"pixelgpt score: {len(tokens)} sequences, mean NLL {nll.mean():.4f} nats/token -> {fv.out}")


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------
def split_features(run, split: str, *, examples: int = 0, desc: str = "features"):
  """One forward pass over `split`: (features [L+1, N, d] — mean_t ln_1(h_l) per layer, then mean_t ln_f —,
  labels [N], tokens [N, T])."""
  config = _split_config(run.config, split, examples)
  cfg = run.setup.model.cfg
  sharding = dict(run.setup.batch_sharding, mask=sharding_lib.batch_sharding(run.mesh))

  @jax.jit
  def features(params, x):
    bert = None if cfg.causal else jnp.zeros(x.shape, bool)
    return run.setup.model.apply({"params": params}, x, bert_mask=bert, return_features=True)[1]

  rows = sharding_lib.local_rows(sharding["tokens"], config.batch_size)
  feats, labels, tokens = [], [], []
  with sharding_lib.activate(run.mesh):
    for host in tqdm(pipeline.make_eval_batches(config, run.palette, rows=rows), desc=desc, unit="batch",
                     leave=False):
      keep = host["mask"] > 0
      batch = pipeline.to_global(host, sharding, config.batch_size)
      feats.append(np.asarray(features(run.params, batch["tokens"]))[:, keep])
      labels.append(host["label"][keep])
      tokens.append(host["tokens"][keep])
  return np.concatenate(feats, axis=1), np.concatenate(labels), np.concatenate(tokens)


def raw_pixels(config, split: str, n: int) -> np.ndarray:
  """The first n images of `split` at the model's resolution, unquantized, in [-1, 1]: the probe's baseline."""
  source = sources.get_source(config.dataset, split)
  images = [pipeline.resize(source[i]["image"], config.dataset.resolution, config.dataset.channels)
            for i in range(n)]
  return palette_lib.to_unit(np.stack(images))


def probe_flags(fv):
  _workdir_flag(fv)
  flags.DEFINE_integer("train_examples", 0, "Probe on the first N training examples (0: all).", flag_values=fv)
  flags.DEFINE_integer("test_examples", 0, "Evaluate on the first N test examples (0: all).", flag_values=fv)


def probe_main(fv):
  _require_workdir(fv)
  run = workdir_lib.open_run(fv.workdir)
  result = linear_probe(run, fv.workdir, train_examples=fv.train_examples, test_examples=fv.test_examples)
  print(f"pixelgpt probe: {run.config.dataset.name}, step {run.step}")
  print(f"{'layer':>8} {'accuracy':>9}")
  for row in result["layers"]:
    mark = "  <- best" if row["layer"] == result["best_layer"] else ""
    print(f"{row['layer']:>8} {100 * row['accuracy']:8.2f}%{mark}")
  print(f"{'pixels':>8} {100 * result['raw_pixels_accuracy']:8.2f}%  (raw-pixel baseline)")
  w = storage.path(fv.workdir)
  print(f"-> {w / 'probe.json'}, {w / 'probe.png'}")


def linear_probe(run, workdir, *, train_examples: int = 0, test_examples: int = 0) -> dict:
  """The paper's linear probe on every layer; writes W/probe.json and the accuracy-by-depth plot W/probe.png.

  Layer l (0-based) is the mean over positions of ln_1(h_l), the normed input of block l; layer n_layer is the
  final ln_f output.
  """
  d = run.config.dataset
  train_x, train_y, _ = split_features(run, d.train_split, examples=train_examples, desc="train features")
  test_x, test_y, _ = split_features(run, d.eval_split, examples=test_examples, desc="test features")
  layers = probe_lib.probe_layers(train_x, train_y, test_x, test_y, seed=run.config.seed)
  raw = probe_lib.raw_pixel_baseline(raw_pixels(run.config, d.train_split, len(train_y)), train_y,
                                     raw_pixels(run.config, d.eval_split, len(test_y)), test_y,
                                     seed=run.config.seed)
  best = max(layers, key=lambda r: r["accuracy"])
  result = {"dataset": d.name, "split": d.eval_split, "step": run.step,
            "train_examples": int(len(train_y)), "test_examples": int(len(test_y)),
            "layers": [{"layer": r["layer"], "accuracy": r["accuracy"], "l2": r["l2"]} for r in layers],
            "best_layer": best["layer"], "best_accuracy": best["accuracy"],
            "raw_pixels_accuracy": raw["accuracy"]}
  w = storage.path(workdir)
  storage.write_atomic(w / "probe.json", json.dumps(result, indent=2))
  probe_lib.plot_accuracy_by_layer(layers, raw["accuracy"], w / "probe.png",
                                   f"linear probe: {d.name} ({d.eval_split}), step {run.step}")
  return result


# ----------------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------------
def finetune_flags(fv):
  _workdir_flag(fv)
  flags.DEFINE_string("out", None, "Workdir of the fine-tuned run.", flag_values=fv)
  flags.DEFINE_integer("steps", 500, "Fine-tuning steps.", flag_values=fv)
  flags.DEFINE_float("lr", 0.0, "Peak learning rate (0: the pretraining lr).", flag_values=fv)


def finetune_main(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.require(fv, "workdir", "out")
  result = finetune(fv.workdir, fv.out, steps=fv.steps, lr=fv.lr)
  print(f"pixelgpt finetune: {result['steps']} steps, test accuracy {100 * result['test_accuracy']:.2f}% "
        f"on {result['test_examples']} examples -> {storage.path(fv.out) / 'finetune.json'}")


def _num_classes(config, scan: int = 5000) -> int:
  """1 + the largest label among the first `scan` training records (a source knows no class list)."""
  source = sources.get_source(config.dataset, config.dataset.train_split)
  return 1 + max(int(source[i]["label"]) for i in range(min(scan, len(source))))


def _classify(model, params, tokens):
  """(generative logits [B, T, K], class logits [B, C]) from the mean-pooled ln_f output, as in the paper."""
  cfg = model.cfg
  bert = None if cfg.causal else jnp.zeros(tokens.shape, bool)
  logits, features = model.apply({"params": params["model"]}, tokens, bert_mask=bert, return_features=True)
  pooled = features[-1]
  return logits, pooled @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def finetune(workdir, out, *, steps: int, lr: float = 0.0) -> dict:
  """Fine-tunes all weights plus a linear classifier with L = L_gen + L_clf; checkpoints and finetune.json in
  `out`. The classifier starts at zero, so step 0 is exactly the pretrained generative model."""
  if steps <= 0:
    raise UserError(f"--steps must be positive, got {steps}")
  run = workdir_lib.open_run(workdir)
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
    def loss_fn(p):
      logits, class_logits = _classify(model, p, batch["tokens"])
      generative = model_lib.token_nll(logits, batch["tokens"]).mean()
      classification = optax.softmax_cross_entropy_with_integer_labels(class_logits, batch["label"]).mean()
      return generative + classification, (generative, classification)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return train.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), parts

  out = storage.usable(out, what="--out")
  rows = sharding_lib.local_rows(run.setup.batch_sharding["tokens"], config.batch_size)
  data = pipeline.make_train_iterator(config, run.palette, rows=rows)
  checkpointer = ckpt_lib.Checkpointer(out, keep=1)
  config_json = config_lib.to_json(config)
  log = []
  with sharding_lib.activate(mesh):
    for i in tqdm(range(1, steps + 1), desc="finetune", unit="step"):
      batch = pipeline.to_global(next(data), run.setup.batch_sharding, config.batch_size)
      state, (generative, classification) = step_fn(state, batch)
      if i % max(1, steps // 10) == 0 or i == steps:
        log.append({"step": i, "loss/gen": float(generative), "loss/clf": float(classification)})
    checkpointer.save(steps, state, data, config_json=config_json, palette=run.palette)
    checkpointer.close()

    predict = jax.jit(lambda p, x: jnp.argmax(_classify(model, p, x)[1], axis=-1))
    sharding = dict(run.setup.batch_sharding, mask=sharding_lib.batch_sharding(mesh))
    correct = total = 0
    test_config = _split_config(config, config.dataset.eval_split)
    for host in pipeline.make_eval_batches(test_config, run.palette, rows=rows):
      keep = host["mask"] > 0
      batch = pipeline.to_global(host, sharding, config.batch_size)
      predicted = np.asarray(predict(state.params, batch["tokens"]))
      correct += int((predicted[keep] == host["label"][keep]).sum())
      total += int(keep.sum())
  palette_lib.save(out / "palette.npy", run.palette)
  storage.write_atomic(out / "config.json", config_json)
  result = {"pretrained_workdir": str(storage.path(workdir)), "pretrained_step": run.step, "steps": steps,
            "lr": config.optim.lr, "test_accuracy": correct / max(total, 1), "test_examples": total, "log": log}
  storage.write_atomic(out / "finetune.json", json.dumps(result, indent=2))
  return result
