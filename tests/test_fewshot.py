"""The few-shot evaluator: the closed-form ridge classifier against numpy, balanced nested shot sets, and the
metrics a training run writes at its eval steps."""

import json

import numpy as np
import pytest

from pixelgpt import fewshot
from tests.conftest import load_config


def _ridge_reference(shot_x, shot_y, test_x, l2, num_classes):
  """W = (ZᵀZ + l2·I)⁻¹ Zᵀ T in float64, Z the shot features centred and RMS-scaled, T ±1 one-hot."""
  mean = shot_x.mean(0)
  scale = np.sqrt(((shot_x - mean) ** 2).mean()) + 1e-6
  z = (shot_x - mean) / scale
  targets = 2.0 * np.eye(num_classes)[shot_y] - 1.0
  w = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ targets)
  return np.argmax(((test_x - mean) / scale) @ w, axis=1)


def test_ridge_classifier_matches_numpy_and_ignores_rows_weighted_zero():
  rng = np.random.default_rng(0)
  means = 3.0 * rng.normal(size=(4, 16))
  shot_y, test_y = np.repeat(np.arange(4), 5), rng.integers(0, 4, 200)
  shot_x = (means[shot_y] + rng.normal(size=(20, 16))).astype(np.float32)
  test_x = (means[test_y] + rng.normal(size=(200, 16))).astype(np.float32)
  expected = np.mean(_ridge_reference(shot_x.astype(np.float64), shot_y, test_x, 1.0, 4) == test_y)
  # Padded to 32 shot rows laid out [batches, batch, d], as evaluate.feature_pass gives them.
  pad_x = np.concatenate([shot_x, 100 * rng.normal(size=(12, 16)).astype(np.float32)]).reshape(4, 8, 16)
  pad_y = np.concatenate([shot_y, np.zeros(12, int)]).reshape(4, 8)
  pad_w = (np.arange(32) < 20).astype(np.float32).reshape(4, 8)
  got = fewshot.ridge_accuracy(pad_x, pad_y, pad_w, test_x, test_y, np.ones(200, np.float32), 1.0, num_classes=4)
  assert float(got) == pytest.approx(expected, abs=1e-6) and expected > 0.9


def test_shot_sets_are_balanced_nested_and_seeded():
  config = load_config("smoke")
  indices, labels = fewshot.choose_shots(config, 5)
  assert len(indices) == 50 and len(set(indices.tolist())) == 50
  for k in range(1, 6):  # the first 10·k rows hold k images of each digit
    assert np.array_equal(np.bincount(labels[:10 * k], minlength=10), np.full(10, k))
  again, _ = fewshot.choose_shots(config, 5)
  other, _ = fewshot.choose_shots(load_config("smoke", seed=1), 5)
  assert np.array_equal(indices, again) and not np.array_equal(indices, other)
  indices, labels = fewshot.choose_shots(config, 1000)  # digits has 150-170 training images of each class
  rarest = np.bincount(labels).min()
  assert 100 < rarest < 1000 and len(indices) == 10 * rarest


def test_metric_names():
  name = fewshot.metric_name("tfds:imagenet_resized/32x32", 10, 24)
  assert name == "fewshot/tfds_imagenet_resized_32x32_10shot_layer24"
  assert fewshot.metric_name("digits", 5, fewshot.PIXELS) == "fewshot/digits_5shot_pixels"


def test_a_config_written_before_the_fewshot_group_existed_reads_with_its_defaults():
  from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top
  stored = load_config("smoke").to_dict()
  del stored["fewshot"], stored["mesh"]["axis_order"]
  config = config_lib.from_json(json.dumps(stored))
  assert tuple(config.fewshot.layers) == () and config.mesh.axis_order == "data,fsdp,tensor"
  assert config.model.n_layer == stored["model"]["n_layer"]  # what was stored wins
