"""Seeing a run: a profiler trace that `pixelgpt profile` reads, goodput kept across a kill and a resume, sample
grids and eval/probe results in TensorBoard, read back with TensorBoard's own reader."""

import json
import signal
import time

import jax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from pixelgpt import errors
from pixelgpt import goodput
from pixelgpt import metrics as metrics_lib
from pixelgpt import profile
from pixelgpt import train
from pixelgpt.data import pipeline
from tests.conftest import load_config, run_pixelgpt, start_pixelgpt, wait_for

TINY = ["--config.batch_size=16", "--config.model.n_layer=2", "--config.model.d_model=32", "--config.model.n_head=4",
        "--config.palette.fit_pixels=20000", "--config.log_every=1", "--config.eval_every=0",
        "--config.fewshot.layers=()"]


def _tensorboard(workdir):
  events = event_accumulator.EventAccumulator(str(workdir / "tb"), size_guidance={event_accumulator.IMAGES: 0,
                                                                                  event_accumulator.SCALARS: 0})
  events.Reload()
  return events


def test_profile_goodput_across_a_kill_and_tensorboard_images(tmp_path):
  w = tmp_path / "run"
  args = ["train", "--config", "configs/smoke.py", "--workdir", w, *TINY, "--config.total_steps=24",
          "--config.checkpoint_every=4", "--config.sample_every=12", "--config.profile_steps=2",
          "--config.profile_start_step=2"]
  walls = []
  # Session 1: traced at steps 2-3, checkpointed at 4 (the asynchronous save finished), killed outright after
  # at least two more steps.
  start = time.perf_counter()
  proc = start_pixelgpt(*args, devices=2)
  saved = lambda: (w / "checkpoints" / "4" / "commit_success.txt").exists()
  assert wait_for(lambda: saved() and len(metrics_lib.read_metrics(w)) >= 6, [proc], poll=0.01), proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  walls.append(time.perf_counter() - start)
  killed_at = len(metrics_lib.read_metrics(w))
  resumed_from = max(int(p.name) for p in (w / "checkpoints").iterdir() if (p / "commit_success.txt").exists())
  # Session 2: resumes from the last checkpoint saved and redoes what came after it.
  start = time.perf_counter()
  run_pixelgpt(*args, devices=2)
  walls.append(time.perf_counter() - start)

  # The trace: `pixelgpt profile` names the matmuls and sorts the time into categories.
  out = run_pixelgpt("profile", "--workdir", w, "--json", "--top", "1000").stdout
  summary = json.loads(out)
  assert summary["steps"] == 2 and summary["categories"]["matmul"] > 0
  assert any(op["category"] == "matmul" for op in summary["top"])
  assert "matmul" in run_pixelgpt("profile", "--workdir", w).stdout

  # Goodput: both sessions on record, the steps after the checkpoint counted as lost, the whole wall accounted.
  sessions = goodput.load(w)
  assert [(s.start_step, s.end) for s in sessions] == [(0, None), (resumed_from, "finished")]
  assert sessions[0].step >= killed_at - 1 > resumed_from
  report = json.loads(run_pixelgpt("goodput", "--workdir", w, "--json").stdout)
  totals = report["totals"]
  first, second = sessions[0].seconds, sessions[1].seconds
  train_kept, wait_kept = sessions[0].step_seconds_at(resumed_from)
  assert totals["lost"] > 0
  assert abs(totals["lost"] - (first["train"] - train_kept + first["data_wait"] - wait_kept)) < 1e-6
  assert abs(totals["train"] - (train_kept + second["train"])) < 1e-6
  recorded = sum(totals.values())
  print(f"goodput: {recorded:.2f} s recorded, {sum(walls):.2f} s measured")
  assert abs(recorded - sum(walls)) < 0.06 * sum(walls), (recorded, walls)
  assert all(v >= 0 for v in totals.values()), totals
  logged = metrics_lib.read_metrics(w)
  assert logged[-1]["goodput/lost_s"] > 0 and logged[3]["goodput/lost_s"] == 0  # before the kill: none lost
  assert all(0 <= m["perf/data_wait_s"] < m["perf/step_time_s"] for m in logged)
  table = run_pixelgpt("goodput", "--workdir", w).stdout
  assert "lost" in table and "killed" in table and "finished" in table

  # TensorBoard: the sample grids at their steps, the scalars beside.
  events = _tensorboard(w)
  assert [e.step for e in events.Images("samples")] == [12, 24]
  assert {"perf/data_wait_s", "goodput/lost_s", "goodput/goodput"} <= set(events.Tags()["scalars"])

  # eval and sample commands add their results to the same TensorBoard at the checkpoint's step.
  run_pixelgpt("eval", "--workdir", w)
  run_pixelgpt("sample", "--workdir", w, "--num", "4")
  events = _tensorboard(w)
  assert [e.step for e in events.Scalars("eval/digits_test_loss")] == [24]
  assert [e.step for e in events.Images("samples/seed_0")] == [24]


def test_profile_of_a_host_without_a_trace_is_a_clear_error(tmp_path):
  run = profile.runs_directory(tmp_path) / "steps_0000002-0000003"
  run.mkdir(parents=True)
  (run / "worker-0.p0.xplane.pb").write_bytes(b"")
  with pytest.raises(errors.UserError, match=r"no trace of host 'worker-1' .*\(traces: worker-0.p0.xplane.pb\)"):
    profile.read(tmp_path, host="worker-1")


def test_goodput_accounts_a_resume_from_an_older_checkpoint():
  """Session 2 is killed before saving; session 3 resumes from session 1's checkpoint at 10: everything session 2
  did and session 1's steps after 10 are lost, and nothing is counted twice."""
  def session(name, start, step, train, wait, marks):
    return goodput.Session(name=name, started=float(len(name)), start_step=start, step=step, wall_s=train + wait,
                           seconds={"train": train, "data_wait": wait}, marks=marks)
  sessions = [session("a", 0, 14, 14.0, 1.4, [[10, 10.0, 1.0]]),  # checkpoint 10, killed at 14
              session("bb", 10, 13, 3.0, 0.3, []),  # no checkpoint, killed at 13
              session("ccc", 10, 20, 10.0, 1.0, [[20, 10.0, 1.0]])]
  totals = goodput.account(sessions)
  assert totals["lost"] == (4.0 + 0.4) + (3.0 + 0.3)
  assert totals["train"] == 10.0 + 10.0 and abs(totals["data_wait"] - 2.0) < 1e-12
  assert abs(sum(totals.values()) - sum(s.wall_s for s in sessions)) < 1e-12


def test_input_waits_are_measured_and_a_slow_pipeline_is_warned_about(tmp_path, monkeypatch, capsys):
  """Each batch's hand-over to the devices made 50 ms slower: perf/data_wait_s sees it, and one warning goes out
  (not for the first interval, which holds the pipeline's start-up)."""
  real = pipeline.to_global

  def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline, "to_global", slow)
  config = load_config("smoke", **{"total_steps": 100, "log_every": 2, "eval_every": 0, "checkpoint_every": 0,
                                   "batch_size": 16, "model.n_layer": 1, "model.d_model": 32, "model.n_head": 4,
                                   "palette.fit_pixels": 20_000, "fewshot.layers": ()})
  train.run(config, str(tmp_path), devices=jax.devices()[:1], stop_after=6)
  logged = metrics_lib.read_metrics(tmp_path)
  assert [m["step"] for m in logged] == [2, 4, 6]
  assert all(0.05 <= m["perf/data_wait_s"] < m["perf/step_time_s"] for m in logged), logged
  warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
  assert len(warnings) == 1 and "step 4" in warnings[0] and "worker_count" in warnings[0], warnings
