"""The trainer: sharded == unsharded, exact resume, the CLI end to end, and one-line errors for bad input."""

import json
import os

import jax
import numpy as np

from pixelgpt import train
from tests.conftest import load_config, run_pixelgpt

TINY = {"total_steps": 8, "log_every": 1, "eval_every": 4, "checkpoint_every": 4, "batch_size": 16,
        "model.n_layer": 2, "model.d_model": 32, "model.n_head": 4, "palette.fit_pixels": 20_000}


def _losses(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def _params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.leaves(restored["params"]), jax.tree.leaves(restored["opt_state"])


def test_sharded_2x2x2_matches_one_device(tmp_path):
  one = load_config("smoke", **TINY)
  train.run(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = load_config("smoke", **TINY, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  train.run(eight, str(tmp_path / "eight"), devices=jax.devices()[:8])
  a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-3)
  assert _losses(tmp_path / "one", "eval/loss").keys() == {4, 8}
  np.testing.assert_allclose(_losses(tmp_path / "eight", "eval/loss")[8], _losses(tmp_path / "one", "eval/loss")[8],
                             rtol=2e-3)


def test_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
  config = load_config("smoke", **TINY, **{"dataset.flip": True})
  devices = jax.devices()[:2]
  train.run(config, str(tmp_path / "straight"), devices=devices)
  train.run(config, str(tmp_path / "resumed"), devices=devices, stop_after=3)  # checkpoints at 3, as if preempted
  assert _losses(tmp_path / "resumed").keys() == {1, 2, 3}
  train.run(config, str(tmp_path / "resumed"), devices=devices)
  straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
  assert resumed == straight  # bitwise: same data order, same updates
  # smoke.py's few-shot evaluator (layers 1 and -1 = 2 here) ran at the eval steps only, the same in both runs.
  names = [f"fewshot/digits_{k}shot_{layer}" for k in (1, 5, 10, 25) for layer in ("layer1", "layer2", "pixels")]
  for name in names:
    shots = _losses(tmp_path / "straight", name)
    assert shots.keys() == {4, 8} and shots == _losses(tmp_path / "resumed", name), name
  assert _losses(tmp_path / "straight", names[-2])[8] > 0.2  # 25 digits per class on 1,000 held-out (chance 0.1)
  pixels = _losses(tmp_path / "straight", names[-1])
  assert pixels[4] == pixels[8] > 0.8  # the raw-pixel baseline: computed once, logged beside every curve
  assert (tmp_path / "resumed" / "fewshot.png").is_file()  # the curves, both runs' steps
  for a, b in zip(*(_params(tmp_path / w, 8) for w in ("straight", "resumed"))):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_cli_trains_writes_the_workdir_and_resumes(tmp_path):
  workdir = str(tmp_path / "w")
  args = ["train", "--config", "configs/smoke.py", "--workdir", workdir, "--config.total_steps=60",
          "--config.eval_every=30", "--config.checkpoint_every=30"]
  proc = run_pixelgpt(*args, devices=2)
  for name in ("config.json", "palette.npy", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30", "60"]
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_000060.png"]
  palette = np.load(os.path.join(workdir, "palette.npy"))
  assert palette.shape == (16, 1) and palette.dtype == np.float32 and np.abs(palette).max() <= 1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for key in ("step", "train/loss", "lr", "grad_norm", "perf/step_time_s", "perf/tokens_per_sec",
              "perf/tflops_per_device", "perf/mfu"):
    assert all(key in r for r in rows), key
  assert rows[-1]["train/loss"] < 0.75 * rows[0]["train/loss"]
  assert "eval/loss" in rows[-1] and "samples in" in proc.stdout

  again = run_pixelgpt(*args, devices=2)
  assert "already trained to step 60" in again.stdout + again.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == len(rows)  # nothing was retrained
