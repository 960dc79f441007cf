"""Fault injection with real subprocesses, real signals and real damaged files: nothing is lost or changed."""

import glob
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pixelgpt import metrics as metrics_lib
from tests.conftest import finish_job, run_pixelgpt, start_job, start_pixelgpt, wait_for

TINY = ["--config.batch_size=16", "--config.model.n_layer=2", "--config.model.d_model=32", "--config.model.n_head=4",
        "--config.palette.fit_pixels=20000", "--config.log_every=1", "--config.eval_every=0",
        "--config.dataset.flip=True"]


def _args(workdir, *extra):
  return ["train", "--config", "configs/smoke.py", "--workdir", workdir, *TINY, *extra]


def _run(workdir, *extra, check=True):
  return run_pixelgpt(*_args(workdir, *extra), devices=2, check=check)


def _start(workdir, *extra):
  return start_pixelgpt(*_args(workdir, *extra), devices=2)


def _state(workdir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return restored


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f)}


def _logged_steps(workdir):
  return len(metrics_lib.read_metrics(workdir))  # mid-run: metrics.jsonl and the tail logged since the last seal


def test_sigkill_at_any_moment_resumes_bitwise_identically(tmp_path):
  steps = ["--config.total_steps=40", "--config.checkpoint_every=4", "--config.keep_checkpoints=2"]
  straight = tmp_path / "straight"
  _run(straight, *steps)

  killed = tmp_path / "killed"
  # 1: killed while an asynchronous checkpoint write is in flight (orbax's temporary directory exists).
  proc = _start(killed, *steps)
  in_flight = lambda: bool(glob.glob(str(killed / "checkpoints" / "*tmp*")))
  assert wait_for(in_flight, [proc], poll=0.002), "the run ended before a checkpoint write was seen"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # 2 and 3: killed between checkpoints, at arbitrary steps.
  for after_steps in (3, 9):
    before = _logged_steps(killed)
    proc = _start(killed, *steps)
    if wait_for(lambda: _logged_steps(killed) >= before + after_steps, [proc]):
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  _run(killed, *steps)  # the same command, until done

  a, b = _state(straight, 40), _state(killed, 40)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)  # parameters and optimizer state, bit for bit
  assert _losses(killed) == _losses(straight)  # and the same data order all along


def test_sigterm_checkpoints_and_exits_0_then_resumes(tmp_path):
  workdir = tmp_path / "w"
  steps = ["--config.total_steps=100000", "--config.checkpoint_every=100000"]
  proc = _start(workdir, *steps)
  assert wait_for(lambda: _logged_steps(workdir) >= 5, [proc])
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0 and time.time() - start < 60, out[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in out
  saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
  assert os.listdir(workdir / "checkpoints") == [str(saved)]

  proc = _start(workdir, *steps)
  assert wait_for(lambda: _logged_steps(workdir) >= saved + 2, [proc])
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert f"resuming from step {saved}" in out and proc.returncode == 0


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_and_resumes(tmp_path):
  workdir = tmp_path / "w"
  steps = ["--config.total_steps=100000", "--config.checkpoint_every=100000"]
  procs = start_job(*_args(workdir, *steps), processes=2, devices=1, logs=tmp_path)
  assert wait_for(lambda: _logged_steps(workdir) >= 5, procs)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only: JAX's preemption service tells process 0
  start = time.time()
  out = finish_job(procs, timeout=60)
  assert time.time() - start < 60 and "SIGTERM: saved a checkpoint at step" in out, out[-3000:]
  saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
  # One step, saved by both processes together: one checkpoint holding both processes' iterator states.
  assert os.listdir(workdir / "checkpoints") == [str(saved)]
  assert sorted(f for f in os.listdir(workdir / "checkpoints" / str(saved) / "data") if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  out = finish_job(start_job(*_args(workdir, f"--config.total_steps={saved + 2}", "--config.checkpoint_every=100000"),
                             processes=2, devices=1, logs=tmp_path))
  assert f"resuming from step {saved}" in out
  assert sorted(m["step"] for m in metrics_lib.read_metrics(workdir)) == list(range(1, saved + 3))


@pytest.mark.parametrize("skip", [False, True])
def test_divergence_stops_naming_the_step_and_never_saves_nan(tmp_path, skip):
  workdir = tmp_path / "w"
  proc = _run(workdir, "--config.total_steps=12", "--config.checkpoint_every=1", "--config.optim.lr=1e30",
              "--config.optim.grad_clip=0", "--config.optim.warmup_steps=0", f"--config.optim.skip_nonfinite={skip}",
              check=False)
  if skip:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped" in proc.stdout
    with open(workdir / "metrics.jsonl") as f:
      assert json.loads(f.readlines()[-1])["train/skipped_steps"] > 0
  else:
    assert proc.returncode == 1
    line = [l for l in proc.stderr.splitlines() if "diverged" in l]
    assert len(line) == 1 and "training diverged at step " in line[0], proc.stderr[-3000:]
    diverged_at = int(line[0].split("at step ")[1].split(":")[0])
    assert all(int(s) < diverged_at for s in os.listdir(workdir / "checkpoints"))
  for step in os.listdir(workdir / "checkpoints"):
    assert all(np.isfinite(x).all() for x in _leaves(_state(workdir, step)))


@pytest.fixture(scope="module")
def trained_to_8(tmp_path_factory):
  """One run to step 8 with checkpoints at 4 and 8, which each damage test copies (and damages its own copy)."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  _run(workdir, "--config.total_steps=8", "--config.checkpoint_every=4")
  return workdir


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "meta"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, trained_to_8):
  workdir = tmp_path / "w"
  shutil.copytree(trained_to_8, workdir)
  if damage == "meta":
    victim = next(iter(glob.glob(str(workdir / "checkpoints" / "8" / "meta" / "*"))))
  else:
    files = [f for f in glob.glob(str(workdir / "checkpoints" / "8" / "state" / "**"), recursive=True)
             if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, "rb").read())
  if damage == "truncate":
    data = data[:len(data) // 2]
  else:
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
  with open(victim, "wb") as f:
    f.write(bytes(data))

  proc = _run(workdir, "--config.total_steps=12", "--config.checkpoint_every=4")
  lines = [l for l in proc.stderr.splitlines() if "is damaged" in l]
  assert len(lines) == 1 and lines[0].startswith("pixelgpt: checkpoint 8 is damaged"), proc.stderr[-3000:]
  assert "resuming from step 4" in proc.stdout
  assert os.path.isdir(workdir / "damaged_checkpoints" / "8")
  assert sorted(os.listdir(workdir / "checkpoints"), key=int)[-1] == "12"


def test_resuming_with_another_model_shape_or_palette_is_one_line_exit_2(tmp_path):
  workdir = tmp_path / "w"
  _run(workdir, "--config.total_steps=2")
  proc = _run(workdir, "--config.total_steps=4", "--config.model.d_model=64", check=False)
  assert proc.returncode == 2 and "model.d_model=32" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

  palette = tmp_path / "palette8.npy"
  np.save(palette, np.linspace(-1, 1, 8, dtype=np.float32)[:, None])
  proc = _run(tmp_path / "other", f"--config.palette.path={palette}", check=False)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "palette8.npy" in proc.stderr


@pytest.mark.parametrize("skip", [True, False])
def test_unreadable_images_are_skipped_and_counted_or_fail_in_one_line(tmp_path, skip):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    os.makedirs(tmp_path / "images" / label)
    for i in range(20):
      Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
  for name in ("3.png", "7.png"):
    with open(tmp_path / "images" / "a" / name, "wb") as f:
      f.write(b"not a png at all")
  proc = _run(tmp_path / "w", f"--config.dataset.name=folder:{tmp_path / 'images'}", "--config.total_steps=6",
              f"--config.dataset.skip_unreadable={skip}", check=False)
  if skip:
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = re.findall(r"skipping unreadable image (\S+) \((\d+) so far\)", proc.stderr)
    assert skipped and {p for p, _ in skipped} <= {str(tmp_path / "images" / "a" / n) for n in ("3.png", "7.png")}
    assert [int(n) for _, n in skipped] == list(range(1, len(skipped) + 1))  # each file once, counted
  else:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreadable image" in lines[0] and "Traceback" not in proc.stderr
