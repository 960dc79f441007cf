"""The paper's linear probe, classifier half: L2-regularised multinomial logistic regression on frozen features.

Features are rows over any leading dimensions ([N, D], or [batches, batch, D] as evaluate.py streams them, sharded
over the devices), each with a weight: 0 drops a row (padding, or the rows of another part of the split), so the
fit/validation carve and the padding need no gathers and the solver runs where the features are. Selection is
honest: the L2 strength is chosen on a validation part carved from the training split, never on test.
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


def _rows(x):
  return tuple(range(x.ndim - 1))  # every axis but the feature axis holds rows


def _objective(params, x, y, weights, l2):
  w, b = params
  loss_nats = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)
  return jnp.sum(weights * loss_nats) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(w * w)  # the bias is not penalised


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(x, y, weights, l2, *, num_classes):
  """Full-batch L-BFGS from zero on standardised x; returns W, b in raw-feature space and the steps taken."""
  rows, total = _rows(x), jnp.sum(weights)
  mean = jnp.sum(weights[..., None] * x, axis=rows) / total
  std = jnp.sqrt(jnp.sum(weights[..., None] * (x - mean) ** 2, axis=rows) / total)
  # A (nearly) constant feature would be blown up to ±1 by its rounding error, and a test value that differs
  # from the constant would then explode; leaving it unscaled keeps it harmless.
  scale = jnp.where(std > 1e-6 * (1.0 + jnp.abs(mean)), std, 1.0)
  z = (x - mean) / scale
  loss_fn = functools.partial(_objective, x=z, y=y, weights=weights, l2=l2)
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
  params = (jnp.zeros((x.shape[-1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  (w, b), state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  # Fold the standardisation in, so callers need only logits = x @ W + b on raw features.
  w_raw = w / scale[:, None]
  return w_raw, b - mean @ w_raw, optax.tree.get(state, "count")


def _weights_of(y, weights):
  return jnp.ones(jnp.shape(y), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)


def fit_logistic(train_x, train_y, *, l2: float, num_classes: int, weights=None) -> tuple[jax.Array, jax.Array]:
  """Minimises the weighted mean cross-entropy + l2/2·||W||² over features standardised with the weighted rows'
  mean and std.

  Args:
    train_x: [..., D] features (numpy, or jax arrays sharded over the rows).
    train_y: [...] integer labels in [0, num_classes).
    l2: penalty strength on the standardised-feature weights.
    num_classes: C.
    weights: [...] row weights (default 1): 0 leaves a row out.

  Returns:
    W [D, C] and b [C] with the standardisation folded in: logits = x @ W + b for raw features x.
  """
  w, b, _ = _fit(jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32), _weights_of(train_y, weights),
                 jnp.float32(l2), num_classes=num_classes)
  return w, b


@jax.jit
def _correct(w, b, x, y, weights):
  hits = (jnp.argmax(x.astype(jnp.float32) @ w + b, axis=-1) == y).astype(jnp.float32)
  return jnp.sum(weights * hits), jnp.sum(weights)


def accuracy(w, b, x, y, weights=None) -> float:
  """The weighted share of rows whose argmax class is their label."""
  hits, total = _correct(w, b, jnp.asarray(x), jnp.asarray(y), _weights_of(y, weights))
  return float(hits.addressable_data(0)) / max(float(total.addressable_data(0)), 1.0)


def validation_carve(n: int, fraction: float, seed: int) -> np.ndarray:
  """bool [n]: a seeded `fraction` of the n training examples (at least one) held out for model selection."""
  held = np.zeros(n, bool)
  held[np.random.default_rng(seed).permutation(n)[:max(1, int(round(fraction * n)))]] = True
  return held


def select_and_fit(x, y, fit_weights, val_weights, *, num_classes: int,
                   l2_grid: Sequence[float] = L2_GRID) -> dict:
  """Picks L2 by accuracy on the validation rows of a fit on the fit rows, then refits on both.

  Returns:
    {"l2", "val_accuracy", "w", "b"}: W, b of the refit, for the one test evaluation of whichever is chosen.
  """
  val_accuracy = [accuracy(*fit_logistic(x, y, l2=l2, num_classes=num_classes, weights=fit_weights), x, y,
                           val_weights) for l2 in l2_grid]
  # On a tie prefer the stronger penalty: the simpler classifier.
  best = max(range(len(l2_grid)), key=lambda i: (val_accuracy[i], l2_grid[i]))
  w, b = fit_logistic(x, y, l2=l2_grid[best], num_classes=num_classes,
                      weights=jnp.asarray(fit_weights) + jnp.asarray(val_weights))
  return {"l2": float(l2_grid[best]), "val_accuracy": val_accuracy[best], "w": w, "b": b}


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   l2_grid: Sequence[float] = L2_GRID, seed: int = 0) -> dict:
  """select_and_fit on a seeded VAL_FRACTION of train, then the one test evaluation.

  Returns:
    {"accuracy": test accuracy, "l2": the chosen strength, "val_accuracy": its held-out accuracy}.
  """
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  held = validation_carve(len(train_x), VAL_FRACTION, seed)
  chosen = select_and_fit(train_x, train_y, ~held, held, num_classes=num_classes, l2_grid=l2_grid)
  return {"accuracy": accuracy(chosen["w"], chosen["b"], test_x, test_y), "l2": chosen["l2"],
          "val_accuracy": chosen["val_accuracy"]}


def plot_accuracy_by_layer(layers: list[dict], pixels_val_accuracy: float, chosen: dict, path, title: str) -> None:
  """PNG of validation accuracy against layer, the pixel baseline's dashed, and the chosen layer's test accuracy."""
  # A bare Figure renders through Agg without pyplot, so no global backend or figure registry is touched.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (only plotting needs matplotlib)

  fig = Figure(figsize=(6, 4), dpi=100)
  ax = fig.subplots()
  numbers = [r["layer"] for r in layers]
  ax.plot(numbers, [100 * r["val_accuracy"] for r in layers], "o-", label="linear probe (validation)")
  ax.plot([chosen["layer"]], [100 * chosen["test_accuracy"]], "r*", markersize=12,
          label=f"chosen layer {chosen['layer']} (test)")
  ax.set_xticks(numbers)  # layers are whole numbers
  ax.axhline(100 * pixels_val_accuracy, color="gray", linestyle="--", label="pixels (validation)")
  ax.set(xlabel="layer", ylabel="accuracy (%)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  storage.write_png(storage.path(path), lambda f: fig.savefig(f, format="png"))
