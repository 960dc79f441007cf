"""metrics.jsonl without appends: a bounded tail per log step, a whole rewrite at seals, every step read once, also
after a kill and a resume from an earlier checkpoint."""

import json
import os

from pixelgpt import metrics as metrics_lib


def _writer(workdir, initial_step=0):
  return metrics_lib.MetricWriter(workdir, total_steps=1000, initial_step=initial_step, enabled=True)


def _file_steps(path):
  return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def test_steps_are_read_once_across_seals_kills_and_resumes(tmp_path):
  history, tail = tmp_path / metrics_lib.METRICS_FILE, tmp_path / metrics_lib.TAIL_FILE
  writer = _writer(tmp_path)
  for step in range(1, 6):
    writer.write(step, {"train/loss": float(step)})
    if step == 4:
      writer.seal(step)  # a checkpoint save
  assert _file_steps(history) == [1, 2, 3, 4] and _file_steps(tail) == [5]
  assert [m["step"] for m in metrics_lib.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
  writer.write(6, {"train/loss": 6.0})
  del writer  # killed: never closed

  # Resumed from the checkpoint at step 2 (the one at 4 was damaged, say): steps 3..6 are redone, with new values.
  writer = _writer(tmp_path, initial_step=2)
  assert _file_steps(history) == [1, 2] and not tail.exists()
  for step in range(3, 8):
    writer.write(step, {"train/loss": 10.0 * step})
  writer.close()
  logged = metrics_lib.read_metrics(tmp_path)
  assert [m["step"] for m in logged] == list(range(1, 8)) and _file_steps(history) == list(range(1, 8))
  assert [m["train/loss"] for m in logged] == [1.0, 2.0, 30.0, 40.0, 50.0, 60.0, 70.0]
  assert not tail.exists()


def test_the_tail_stays_bounded_and_tensorboard_rolls_at_seals(tmp_path):
  writer = _writer(tmp_path)
  longest = 0
  for step in range(1, 251):
    writer.write(step, {"train/loss": 1.0})
    longest = max(longest, len(_file_steps(tmp_path / metrics_lib.TAIL_FILE)))
  assert longest == metrics_lib.MAX_TAIL_LINES - 1  # the 100th line seals instead of rewriting the tail
  writer.seal(250)
  writer.close()
  assert _file_steps(tmp_path / metrics_lib.METRICS_FILE) == list(range(1, 251))
  # One event file per sealed interval (two automatic seals and one explicit), in the order TensorBoard reads them.
  events = sorted(os.listdir(tmp_path / "tb"))
  assert len(events) == 4 and [e.rsplit(".", 1)[1] for e in events] == ["000000000", "000000101", "000000201",
                                                                         "000000251"]
