"""Real multi-process JAX on localhost: 2 processes × 4 CPU devices train like 1 process × 8 devices, write one
checkpoint together, and that checkpoint resumes in 1 process on 2 devices (resharded, data order kept)."""

import json
import os
import shutil

import numpy as np

from tests.conftest import finish_job, run_pixelgpt, start_job

ARGS = ["train", "--config", "configs/smoke.py", "--config.total_steps=10", "--config.log_every=1",
        "--config.eval_every=5", "--config.checkpoint_every=5", "--config.batch_size=16", "--config.model.n_layer=2",
        "--config.model.d_model=32", "--config.model.n_head=4", "--config.palette.fit_pixels=20000"]


def _args(workdir, *extra):
  return [*ARGS, "--workdir", workdir, *extra]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f)}


def test_two_processes_train_like_one_and_resume_on_another_mesh(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  run_pixelgpt(*_args(one), devices=8)

  assert "8 cpu device(s)" in finish_job(start_job(*_args(two), processes=2, devices=4, logs=tmp_path))

  reference, multi = _losses(one), _losses(two)
  assert sorted(multi) == list(range(1, 11))
  np.testing.assert_allclose([multi[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-5)
  # Both processes wrote into one checkpoint: arrays, and one iterator state per process.
  data_files = sorted(f for f in os.listdir(os.path.join(two, "checkpoints", "10", "data")) if f.endswith(".json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  assert os.listdir(os.path.join(two, "samples")) == ["step_000010.png"]

  # Drop the last checkpoint and resume from step 5 in one process on two devices: the state is resharded from
  # 8 devices to 2, and the data continues where the two processes left it.
  shutil.rmtree(os.path.join(two, "checkpoints", "10"))
  run_pixelgpt(*_args(two), devices=2)
  resumed = _losses(two)
  assert sorted(resumed) == list(range(1, 11))
  np.testing.assert_allclose([resumed[s] for s in range(6, 11)], [reference[s] for s in range(6, 11)], rtol=1e-4)
