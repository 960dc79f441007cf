"""Few-shot linear evaluation during training (big_vision's few-shot evaluator, for pixels): at eval steps, a
closed-form regularised least-squares classifier from the features of k labelled training images per class to ±1
one-hot targets, scored on held-out images, for k in config.fewshot.shots and each layer in config.fewshot.layers,
beside the same classifier on the raw pixels (the palette colours the model reads) as the baseline to beat.

Representation quality then shows as a curve over training (metrics `fewshot/<dataset>_<k>shot_layer<l>`), not
only in the final probe. The images are fixed for the run: the first k of each class in a seeded order of the
training split (so the 5-shot set holds the 1-shot set), and the first `eval_examples` of the eval split. Features
and solves stay on the devices, sharded over the batch, like the probe's.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from pixelgpt import config as config_lib
from pixelgpt import storage
from pixelgpt.data import pipeline
from pixelgpt.data import sources

SCAN_LIMIT = 20_000  # training records read (labels only matter) to find k per class


PIXELS = "pixels"  # the `layer` of the raw-pixel baseline's metrics


def metric_name(dataset: str, shots: int, layer: int | str) -> str:
  """fewshot/<dataset>_<k>shot_layer<l>, or fewshot/<dataset>_<k>shot_pixels for the raw-pixel baseline."""
  where = PIXELS if layer == PIXELS else f"layer{layer}"
  return f"fewshot/{re.sub(r'[^0-9A-Za-z]+', '_', dataset).strip('_')}_{shots}shot_{where}"


def choose_shots(config, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, their labels): the first j records of each class in a seeded order of the training split,
  for the largest j <= k that every class can fill, ordered by rank within the class, so that the first c·i of
  them are i per class for every i <= j. Labels are read without decoding images where the source allows."""
  source = sources.get_source(config.dataset, config.dataset.train_split)
  order = np.random.default_rng(config.seed).permutation(len(source))[:SCAN_LIMIT]
  picked: dict[int, list[int]] = {}
  for index in order:
    label = source.label(int(index))
    if len(picked.setdefault(label, [])) < k:
      picked[label].append(int(index))
  classes = sorted(picked)
  filled = min(len(picked[c]) for c in classes)
  ranked = [(picked[c][rank], c) for rank in range(filled) for c in classes]
  return np.asarray([i for i, _ in ranked], np.int64), np.asarray([c for _, c in ranked], np.int64)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def ridge_accuracy(shot_x, shot_y, shot_w, test_x, test_y, test_w, l2, *, num_classes: int):
  """Accuracy on the weighted test rows of W = argmin Σ w·||z W - t||² + l2·||W||², t the ±1 one-hot targets of
  the weighted shot rows and z their features centred on the shot rows' mean and scaled by their RMS (so that one
  l2 suits every layer and width). Rows lie over any leading dimensions, as evaluate.feature_pass gives them."""
  rows = tuple(range(shot_x.ndim - 1))
  total = jnp.sum(shot_w)
  mean = jnp.sum(shot_w[..., None] * shot_x, axis=rows) / total
  scale = jnp.sqrt(jnp.sum(shot_w[..., None] * (shot_x - mean) ** 2) / (total * shot_x.shape[-1])) + 1e-6
  z = (shot_x - mean) / scale
  targets = jax.nn.one_hot(shot_y, num_classes) * 2.0 - 1.0
  zw = z * shot_w[..., None]
  gram = jnp.einsum("...d,...e->de", zw, z) + l2 * jnp.eye(z.shape[-1])
  w = jnp.linalg.solve(gram, jnp.einsum("...d,...c->dc", zw, targets))
  predicted = jnp.argmax(((test_x - mean) / scale) @ w, axis=-1)
  return jnp.sum(test_w * (predicted == test_y)) / jnp.maximum(jnp.sum(test_w), 1.0)


class Evaluator:
  """The run's few-shot sets, chosen once; call it with a Run (workdir.Run: setup, mesh, params, palette) at an
  eval step for {metric name: accuracy}."""

  def __init__(self, config):
    f = config.fewshot
    # Negative layers count from the end, as in Python: -1 is the final ln_f (layer n_layer).
    self.layers = tuple(sorted({layer % (config.model.n_layer + 1) for layer in f.layers}))
    self.shots, self.l2 = tuple(sorted(f.shots)), float(f.l2)
    self.dataset = config.dataset.name
    indices, self.labels = choose_shots(config, self.shots[-1])
    self.num_classes = int(self.labels.max()) + 1
    # A small dataset (or a rare class) cannot fill every k: those are skipped, said once, rather than stop a run
    # for the sake of a monitoring metric.
    filled = len(indices) // len(set(self.labels.tolist()))
    if any(k > filled for k in self.shots) and jax.process_index() == 0:
      print(f"pixelgpt: few-shot: the rarest class has {filled} image(s) among the first {SCAN_LIMIT:,} training "
            f"records; skipping {[k for k in self.shots if k > filled]}-shot", flush=True)
    self.shots = tuple(k for k in self.shots if k <= filled)
    # Shot images are read as an eval pass over the training split at those indices; test images as the first
    # eval_examples of the eval split.
    self.shot_config = config_lib.override(config, {"dataset.eval_split": config.dataset.train_split})
    self.indices = indices
    self.test_config = config_lib.override(config, {"dataset.eval_examples": f.eval_examples})
    self.test_indices = range(pipeline.eval_size(self.test_config))  # counted once, not at every evaluation
    self._pixels = None  # the raw-pixel baseline: the same at every step, so computed at the first call only

  def __call__(self, run) -> dict[str, float]:
    from pixelgpt import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports train, which calls this)
    metrics = {}
    if not self.shots:  # the data could fill none of the shot counts: no pass over it
      return metrics
    pixels = self._pixels is None
    shots = evaluate.feature_pass(run, self.shot_config, self.layers, pixels=pixels, indices=self.indices,
                                  desc="few-shot")
    test = evaluate.feature_pass(run, self.test_config, self.layers, pixels=pixels, indices=self.test_indices,
                                 desc="few-shot test")
    # Row r of the shot pass is the (r div classes)-th image of its class: the first k·classes rows are k-shot.
    position = np.arange(shots["mask"].size).reshape(shots["mask"].shape)
    rank = jax.device_put(position, shots["mask"].sharding)
    features = [(layer, shots["features"][g], test["features"][g]) for g, layer in enumerate(self.layers)]
    if pixels:
      features.append((PIXELS, shots["pixels"], test["pixels"]))
    for k in self.shots:
      weights = shots["mask"] * (rank < k * self.num_classes)
      for layer, shot_x, test_x in features:
        accuracy = ridge_accuracy(shot_x, shots["label"], weights, test_x, test["label"], test["mask"], self.l2,
                                  num_classes=self.num_classes)
        metrics[metric_name(self.dataset, k, layer)] = float(accuracy.addressable_data(0))
    if pixels:
      self._pixels = {name: value for name, value in metrics.items() if name.endswith(PIXELS)}
    return {**metrics, **self._pixels}  # the baseline at every step: a flat line beside each curve


def plot_curves(logged: list[dict], path, title: str) -> bool:
  """PNG of few-shot accuracy against training step, one panel per shot count, one line per layer and the raw-pixel
  baseline dashed, from the run's logged metrics. False (nothing written) before any few-shot evaluation."""
  pattern = re.compile(r"^fewshot/.*_(\d+)shot_(layer(\d+)|pixels)$")
  curves: dict[int, dict[str, list[tuple[int, float]]]] = {}
  for m in logged:
    for name, value in m.items():
      match = pattern.match(name)
      if match:
        curves.setdefault(int(match[1]), {}).setdefault(match[2], []).append((m["step"], 100 * value))
  if not curves:
    return False
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (only plotting needs matplotlib)

  fig = Figure(figsize=(3.2 * len(curves), 3.4), dpi=100)
  axes = fig.subplots(1, len(curves), sharey=True, squeeze=False)[0]
  for ax, k in zip(axes, sorted(curves)):
    lines = curves[k]
    for key in sorted((n for n in lines if n != PIXELS), key=lambda n: int(n[len("layer"):])):
      ax.plot(*zip(*lines[key]), "o-", markersize=3, label=key.replace("layer", "layer "))
    if PIXELS in lines:
      ax.axhline(lines[PIXELS][-1][1], color="gray", linestyle="--", label="pixels")
    ax.set(xlabel="training step", title=f"{k}-shot")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  axes[-1].legend(fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  storage.write_png(storage.path(path), lambda f: fig.savefig(f, format="png"))
  return True
