"""The paper's linear probe, classifier half: L2-regularised multinomial logistic regression on frozen features.

Pure functions over numpy arrays [N, D]; evaluate.py extracts the per-layer features, this module scores them.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pixelgpt import storage

# Strengths of the mean-loss penalty l2/2·||W||² on standardised features (sklearn's C = 1 / (l2 · N)).
L2_GRID = tuple(float(v) for v in np.logspace(-6, 0, 7))
VAL_FRACTION = 0.1
MAX_STEPS = 300
GRAD_TOL = 1e-5


def _objective(params, x, y, l2):
  w, b = params
  loss_nats = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()
  return loss_nats + 0.5 * l2 * jnp.sum(w * w)  # the bias is not penalised, as in sklearn


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(x, y, l2, *, num_classes):
  """Full-batch L-BFGS from zero on standardised x; returns W, b in raw-feature space and the steps taken."""
  mean = x.mean(0)
  std = x.std(0)
  # A (nearly) constant feature would be blown up to ±1 by its rounding error, and a test value that differs
  # from the constant would then explode; leaving it unscaled keeps it harmless.
  scale = jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)
  z = (x - mean) / scale
  loss_fn = functools.partial(_objective, x=z, y=y, l2=l2)
  solver = optax.lbfgs()
  # The zoom line search already evaluated the loss and gradient at the accepted point; reuse them.
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < MAX_STEPS) & (grad_norm >= GRAD_TOL))

  # The problem is strictly convex, so a zero start loses nothing and makes the fit independent of any seed.
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  (w, b), state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  # Fold the standardisation in, so callers need only logits = x @ W + b on raw features.
  w_raw = w / scale[:, None]
  return w_raw, b - mean @ w_raw, optax.tree.get(state, "count")


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, *, l2: float,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Minimises mean cross-entropy + l2/2·||W||² over features standardised with train_x's mean and std.

  Args:
    train_x: [N, D] features.
    train_y: [N] integer labels in [0, num_classes).
    l2: penalty strength on the standardised-feature weights.
    num_classes: C.

  Returns:
    W [D, C] and b [C] with the standardisation folded in: logits = x @ W + b for raw features x.
  """
  w, b, _ = _fit(jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32), jnp.float32(l2),
                 num_classes=num_classes)
  return np.asarray(w), np.asarray(b)


def _accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.argmax(np.asarray(x, np.float32) @ w + b, axis=1) == y))


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   l2_grid: Sequence[float] = L2_GRID, seed: int = 0) -> dict:
  """Picks L2 on a seeded held-out 10% of train, refits on all of train, and scores test.

  Returns:
    {"accuracy": test accuracy, "l2": the chosen strength, "val_accuracy": its held-out accuracy}.
  """
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  order = np.random.default_rng(seed).permutation(len(train_x))
  num_val = max(1, int(round(VAL_FRACTION * len(train_x))))
  val, fit = order[:num_val], order[num_val:]
  fit_x, fit_y = train_x[fit], train_y[fit]
  val_accuracy = [_accuracy(*fit_logistic(fit_x, fit_y, l2=l2, num_classes=num_classes), train_x[val], train_y[val])
                  for l2 in l2_grid]
  # On a tie prefer the stronger penalty: the simpler classifier.
  best = max(range(len(l2_grid)), key=lambda i: (val_accuracy[i], l2_grid[i]))
  w, b = fit_logistic(train_x, train_y, l2=l2_grid[best], num_classes=num_classes)
  return {"accuracy": _accuracy(w, b, test_x, test_y), "l2": float(l2_grid[best]),
          "val_accuracy": val_accuracy[best]}


def probe_layers(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray, test_y: np.ndarray, *,
                 l2_grid: Sequence[float] = L2_GRID, seed: int = 0) -> list[dict]:
  """probe_accuracy for each layer of [L, N, D] / [L, M, D] features; each dict also carries its "layer"."""
  return [{"layer": layer, **probe_accuracy(train_feats[layer], train_y, test_feats[layer], test_y,
                                            l2_grid=l2_grid, seed=seed)}
          for layer in range(len(train_feats))]


def raw_pixel_baseline(train_images: np.ndarray, train_y: np.ndarray, test_images: np.ndarray,
                       test_y: np.ndarray, *, l2_grid: Sequence[float] = L2_GRID, seed: int = 0) -> dict:
  """The same probe on flattened raw pixels [N, H, W, C] -> [N, H·W·C]: the bar a learned feature must clear."""
  train_x, test_x = (np.asarray(images, np.float32).reshape(len(images), -1) for images in (train_images, test_images))
  return probe_accuracy(train_x, train_y, test_x, test_y, l2_grid=l2_grid, seed=seed)


def plot_accuracy_by_layer(results: list[dict], raw_pixels_accuracy: float, path, title: str) -> None:
  """PNG of probe accuracy against layer, with the raw-pixel baseline dashed."""
  # A bare Figure renders through Agg without pyplot, so no global backend or figure registry is touched.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (only plotting needs matplotlib)

  fig = Figure(figsize=(6, 4), dpi=100)
  ax = fig.subplots()
  layers = [r["layer"] for r in results]
  ax.plot(layers, [100 * r["accuracy"] for r in results], "o-", label="linear probe")
  ax.set_xticks(layers)  # layers are whole numbers
  ax.axhline(100 * raw_pixels_accuracy, color="gray", linestyle="--", label="raw pixels")
  ax.set(xlabel="layer", ylabel="test accuracy (%)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  storage.write_png(storage.path(path), lambda f: fig.savefig(f, format="png"))
