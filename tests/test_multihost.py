"""Real multi-process JAX on localhost: 2 processes × 4 CPU devices train like 1 process × 8 devices, write one
checkpoint together, and that checkpoint resumes in 1 process on 2 devices (resharded, data order kept); meshes
whose tensor or fsdp axes span the processes train like one process and resume exactly after a kill."""

import json
import os
import shutil

import numpy as np
import pytest

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import metrics as metrics_lib
from tests.conftest import finish_job, kill_job, run_pixelgpt, start_job, wait_for

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


# --- any mesh over two processes: each decodes the rows its devices hold ---------------------------------------------

PLACEMENT_STEPS = ["--config.total_steps=24", "--config.checkpoint_every=8", "--config.eval_every=8",
                   "--config.sample_every=0"]
MESHES = {
    # Every device holds every row: both processes decode the whole batch.
    "tensor4_rows_on_both_processes": ["--config.mesh.fsdp=1", "--config.mesh.tensor=4"],
    # Tensor pairs inside a process, fsdp across the two: each process decodes its half.
    "fsdp_across_processes": ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
    # The transpose (fsdp innermost): tensor pairs span the processes, so each process holds (and decodes) both
    # halves, and each row is decoded by both processes, as on v5e pods.
    "tensor_across_processes": ["--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                                "--config.mesh.axis_order=data,tensor,fsdp"],
}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
  """The run on 1 process × 4 devices (the default mesh, fsdp=4): every mesh's reference."""
  workdir = str(tmp_path_factory.mktemp("placement") / "one")
  run_pixelgpt(*_args(workdir, *PLACEMENT_STEPS), devices=4)
  return workdir


@pytest.mark.parametrize("mesh", MESHES)
def test_any_mesh_over_two_processes_trains_like_one_process_and_resumes_after_a_kill(tmp_path, mesh,
                                                                                      one_process_run):
  workdir = str(tmp_path / "two")
  args = _args(workdir, *PLACEMENT_STEPS, *MESHES[mesh])
  procs = start_job(*args, processes=2, devices=2, logs=tmp_path)
  # Killed once the first checkpoint is committed and a few steps after it are logged.
  killed = wait_for(lambda: ckpt_lib.finished_steps(workdir) and len(metrics_lib.read_metrics(workdir)) >= 10,
                    procs)
  kill_job(procs)
  assert killed, "the run ended before it could be killed"
  out = finish_job(start_job(*args, processes=2, devices=2, logs=tmp_path))
  assert "resuming from step 8" in out or "resuming from step 16" in out, out[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 25))
  reference = _losses(one_process_run)
  np.testing.assert_allclose([losses[s] for s in range(1, 25)], [reference[s] for s in range(1, 25)], rtol=1e-5)


def test_two_processes_probe_like_one(tmp_path, one_process_run):
  """Each process reads its rows; features, classifiers and the choice stay on the mesh: the same result."""
  probe = ["probe", "--workdir", one_process_run, "--train_examples", "600", "--test_examples", "200"]
  run_pixelgpt(*probe, devices=4)
  with open(os.path.join(one_process_run, "probe.json")) as f:
    one = json.load(f)
  os.remove(os.path.join(one_process_run, "probe.json"))
  finish_job(start_job(*probe, processes=2, devices=2, logs=tmp_path))
  with open(os.path.join(one_process_run, "probe.json")) as f:
    two = json.load(f)
  np.testing.assert_allclose([r["feature_rms"] for r in two["layers"]], [r["feature_rms"] for r in one["layers"]],
                             rtol=1e-5)
  for key in ("best_layer", "pixels", "train_examples", "val_examples", "test_examples"):
    assert two[key] == one[key], key
  # Reductions across 2 processes add in another order: a nearly unregularised fit may then settle an example
  # differently, so the validation accuracies and the test accuracy agree to one example.
  np.testing.assert_allclose([r["val_accuracy"] for r in two["layers"]], [r["val_accuracy"] for r in one["layers"]],
                             atol=1.01 / one["val_examples"])
  assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 1.01 / one["test_examples"]


def test_two_processes_evaluate_score_finetune_and_complete_like_one(tmp_path, one_process_run):
  """eval, score, finetune and sample --complete as 2-process jobs: each process feeds its rows and the results
  gathered on the mesh are those of one process (the training run's own eval, an in-process score and finetune
  on 8 devices, and a 1-process greedy completion)."""
  from pixelgpt import evaluate, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  job = lambda *args: finish_job(start_job(*args, processes=2, devices=2, logs=tmp_path))

  out = job("eval", "--workdir", one_process_run)
  nll = json.loads(out[out.index('{"step"'):].splitlines()[0])["nll_nats_per_token"]
  trained = [m for m in metrics_lib.read_metrics(one_process_run) if "eval/loss" in m][-1]
  np.testing.assert_allclose(nll, trained["eval/loss"], rtol=1e-5)

  tokens = np.random.default_rng(0).integers(0, 16, (21, 64), dtype=np.int32)  # not a multiple of the batch
  np.save(tmp_path / "tokens.npy", tokens)
  job("score", "--workdir", one_process_run, "--tokens", tmp_path / "tokens.npy", "--out", tmp_path / "two.npz")
  scored = np.load(tmp_path / "two.npz")
  logits, nll = evaluate.score_tokens(workdir_lib.open_run(one_process_run), tokens)
  np.testing.assert_allclose(scored["logits"], logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scored["nll"], nll, rtol=1e-5)

  job("finetune", "--workdir", one_process_run, "--out", tmp_path / "ft2", "--steps", "3")
  with open(tmp_path / "ft2" / "finetune.json") as f:
    two = json.load(f)
  one = evaluate.finetune(one_process_run, str(tmp_path / "ft1"), steps=3)
  assert two["test_examples"] == one["test_examples"] == 297  # every held-out digit, counted on the mesh
  assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 1.01 / 297
  np.testing.assert_allclose([m["loss/clf"] for m in two["log"]], [m["loss/clf"] for m in one["log"]], rtol=1e-4)

  complete = ["sample", "--workdir", one_process_run, "--complete", "--keep_rows=4", "--num=3", "--temperature=0"]
  run_pixelgpt(*complete, "--out", tmp_path / "one.png", devices=4)
  job(*complete, "--out", tmp_path / "two.png")
  assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()  # greedy: the same pixels
