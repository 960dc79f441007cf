"""The linear probe: separable features are classified, shuffled labels give chance, parity with scikit-learn."""

import numpy as np
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression

from pixelgpt import probe

# A short grid and one problem shape wherever a test allows: each new shape costs a ~1 s compile of the solver.
GRID = (1e-4, 1e-2)
NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 600, 200, 16, 3


def _features(num, dim, num_classes, separation, seed):
  """Gaussian features around class-dependent means, with an offset and scale the probe must standardise away."""
  rng = np.random.default_rng(seed)
  means = separation * rng.normal(size=(num_classes, dim))
  y = rng.integers(0, num_classes, num)
  x = 5.0 + 30.0 * (means[y] + rng.normal(size=(num, dim)))
  return x.astype(np.float32), y


def _split(x, y, num_train):
  return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def test_separable_features_are_classified():
  train_x, train_y, test_x, test_y = _split(*_features(NUM_TRAIN + NUM_TEST, DIM, NUM_CLASSES, 3.0, seed=0), NUM_TRAIN)
  result = probe.probe_accuracy(train_x, train_y, test_x, test_y, l2_grid=GRID)
  assert result["accuracy"] >= 0.99 and result["val_accuracy"] >= 0.99
  assert result["l2"] in GRID


def test_shuffled_labels_give_chance():
  num_classes = 10
  train_x, train_y, test_x, test_y = _split(*_features(4000, 32, num_classes, separation=1.0, seed=1), 2000)
  shuffled = np.random.default_rng(2).permutation(train_y)
  assert probe.probe_accuracy(train_x, train_y, test_x, test_y, l2_grid=GRID)["accuracy"] > 0.9  # signal exists
  assert probe.probe_accuracy(train_x, shuffled, test_x, test_y, l2_grid=GRID)["accuracy"] < 1 / num_classes + 0.1


def _objective(w, b, x, y, l2):
  """Mean cross-entropy + l2/2·||W||², written independently of the probe's JAX version."""
  return -np.mean(log_softmax(x @ w + b, axis=1)[np.arange(len(y)), y]) + 0.5 * l2 * np.sum(w * w)


def test_matches_sklearn():
  num, l2 = NUM_TRAIN, 1e-2
  x, y = _features(num, DIM, NUM_CLASSES, separation=0.3, seed=3)
  # Standardised inputs make the probe's internal standardisation (nearly) the identity, so its W is sklearn's.
  x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
  w, b = probe.fit_logistic(x, y, l2=l2, num_classes=NUM_CLASSES)
  # sklearn minimises C·Σ CE + ½||W||², i.e. N·C times our mean-loss objective when C = 1 / (l2·N).
  ref = LogisticRegression(C=1 / (l2 * num), tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
  assert np.mean(np.argmax(x @ w + b, 1) == ref.predict(x)) >= 0.98
  np.testing.assert_allclose(w, ref.coef_.T, atol=1e-3)
  ours, theirs = _objective(w, b, x, y, l2), _objective(ref.coef_.T, ref.intercept_, x, y, l2)
  assert abs(ours - theirs) <= 1e-3 * theirs
  assert ours <= theirs * (1 + 1e-5)  # and we reach its optimum, not merely its neighbourhood


def test_deterministic():
  train_x, train_y, test_x, test_y = _split(*_features(NUM_TRAIN + NUM_TEST, DIM, NUM_CLASSES, 0.5, seed=4), NUM_TRAIN)
  first = probe.fit_logistic(train_x, train_y, l2=1e-3, num_classes=NUM_CLASSES)
  again = probe.fit_logistic(train_x, train_y, l2=1e-3, num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert (probe.probe_accuracy(train_x, train_y, test_x, test_y, l2_grid=GRID, seed=7)
          == probe.probe_accuracy(train_x, train_y, test_x, test_y, l2_grid=GRID, seed=7))


def test_rows_weighted_zero_are_left_out_whatever_the_layout_and_the_plot_is_written(tmp_path):
  x, y = _features(NUM_TRAIN + NUM_TEST, DIM, NUM_CLASSES, separation=0.5, seed=5)
  keep = np.random.default_rng(6).random(len(x)) < 0.6
  alone = probe.fit_logistic(x[keep], y[keep], l2=1e-2, num_classes=NUM_CLASSES)
  # As evaluate.py streams features: [batches, batch, D], padding and held-out rows weighted 0.
  weighted = probe.fit_logistic(x.reshape(8, -1, DIM), y.reshape(8, -1), l2=1e-2, num_classes=NUM_CLASSES,
                                weights=keep.reshape(8, -1))
  for a, b in zip(weighted, alone):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert probe.accuracy(*alone, x.reshape(8, -1, DIM), y.reshape(8, -1), keep.reshape(8, -1)) == \
      probe.accuracy(*alone, x[keep], y[keep])

  layers = [{"layer": 0, "val_accuracy": 0.4}, {"layer": 1, "val_accuracy": 0.9}]
  path = tmp_path / "probe.png"
  probe.plot_accuracy_by_layer(layers, 0.8, {"layer": 1, "test_accuracy": 0.88}, str(path), title="synthetic")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
