"""Where a run's wall time went, restarts included, from the workdir alone: `W/goodput/<session>.json` and
`pixelgpt goodput --workdir W`.

Each process-0 session of `pixelgpt train` keeps one record, rewritten whole at every log step and checkpoint (an
object store has no appends): the seconds it spent per category since its process started, and at each checkpoint
the cumulative seconds of its steps. A session killed outright leaves its last record, so at most one log interval
of its time goes unaccounted. Steps a later session redoes — those after the checkpoint it resumed from — are
*lost*: their seconds move from `train` (and `data_wait`) to `lost` when the run's records are added up.

Goodput is the `train` share: the wall time spent on steps the run keeps.
"""

import contextlib
import dataclasses
import json
import os
import time

from absl import flags

from pixelgpt import storage
from pixelgpt.errors import UserError

DIRECTORY = "goodput"
# In the order of a session's life. `other`: what no category names (metric and record writes, few-shot plots,
# profile copies, shutdown), the wall time less every category.
CATEGORIES = ("setup", "compile", "restore", "data_wait", "train", "lost", "eval", "checkpoint", "sample", "other")
EXPLAINED = {
    "setup": "process start, imports, mesh, palette, data, model",
    "compile": "the train step's ahead-of-time compile",
    "restore": "reading the checkpoint resumed from",
    "data_wait": "the loop blocked on the input pipeline",
    "train": "train steps kept by the run (goodput)",
    "lost": "steps redone after a restart",
    "eval": "held-out NLL and few-shot evaluations",
    "checkpoint": "the blocking part of checkpoint saves",
    "sample": "sample grids",
    "other": "logging, metric writes, plots, shutdown",
}


@dataclasses.dataclass
class Session:
  """One process-0 `pixelgpt train` session as recorded; `marks` are [step, train_s, data_wait_s] at each
  checkpoint it saved (cumulative); `end` is None while it runs or when it was killed."""
  name: str
  started: float
  start_step: int
  step: int
  wall_s: float
  seconds: dict
  marks: list
  end: str | None = None

  def step_seconds_at(self, step: int) -> tuple[float, float]:
    """(train_s, data_wait_s) spent on this session's steps up to `step`, a checkpoint it saved (or its start)."""
    best = (0.0, 0.0)
    for mark_step, train_s, wait_s in self.marks:
      if mark_step <= step:
        best = (train_s, wait_s)
    return best


def load(workdir) -> list[Session]:
  directory = storage.path(workdir) / DIRECTORY
  if not directory.exists():
    return []
  sessions = [Session(**json.loads(p.read_text())) for p in directory.glob("*.json")]
  return sorted(sessions, key=lambda s: (s.started, s.name))


def account(sessions: list[Session]) -> dict:
  """The run's seconds per category (CATEGORIES), summed over sessions, with redone steps moved to `lost`.

  A session resuming from step c makes every earlier session's steps after c redone; each earlier session keeps
  only its seconds up to c (the cumulative seconds at its checkpoint c, or none when c precedes it).
  """
  totals = dict.fromkeys(CATEGORIES, 0.0)
  kept = []  # per earlier session: [last step still kept, its (train_s, data_wait_s) then]
  for session in sessions:
    for earlier, k in zip(sessions, kept):
      if k[0] > session.start_step:
        now = earlier.step_seconds_at(session.start_step) if session.start_step > earlier.start_step else (0, 0)
        totals["lost"] += (k[1][0] - now[0]) + (k[1][1] - now[1])
        totals["train"] -= k[1][0] - now[0]
        totals["data_wait"] -= k[1][1] - now[1]
        k[0], k[1] = session.start_step, now
    for name in CATEGORIES:
      totals[name] += session.seconds.get(name, 0.0)
    kept.append([session.step, (session.seconds.get("train", 0.0), session.seconds.get("data_wait", 0.0))])
  return totals


def metrics(totals: dict) -> dict:
  """goodput/<category>_s and goodput/<category>_frac, goodput/wall_s, and goodput/goodput (the train share)."""
  wall = sum(totals.values())
  out = {"goodput/wall_s": wall, "goodput/goodput": totals["train"] / wall if wall else 0.0}
  for name in CATEGORIES:
    out[f"goodput/{name}_s"] = totals[name]
    out[f"goodput/{name}_frac"] = totals[name] / wall if wall else 0.0
  return out


class Recorder:
  """The running session's clock: `with recorder.time(category):` around each piece of work, `mark(step)` after a
  checkpoint save, `record(step)` to write the session's file. Only process 0 writes (`enabled`)."""

  def __init__(self, workdir, *, started: float, enabled: bool):
    self._dir = storage.path(workdir) / DIRECTORY
    self._clock_zero = time.perf_counter() - (time.time() - started)  # perf_counter's reading at `started`
    self.enabled = enabled
    self.seconds = dict.fromkeys(CATEGORIES, 0.0)
    self.previous = load(workdir) if enabled else []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    self.session = Session(name=f"{stamp}-{os.uname().nodename}-{os.getpid()}", started=started, start_step=0,
                           step=0, wall_s=0.0, seconds=self.seconds, marks=[])

  @contextlib.contextmanager
  def time(self, category: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[category] += time.perf_counter() - start

  def begin(self, step: int):
    """The session trains from `step`: what it spent so far, not timed by a category, was setup."""
    self.session.start_step = self.session.step = step
    self.seconds["setup"] += self._wall() - sum(self.seconds.values())

  def mark(self, step: int):
    self.session.marks.append([step, self.seconds["train"], self.seconds["data_wait"]])

  def _wall(self) -> float:
    return time.perf_counter() - self._clock_zero

  def _close_books(self, step: int):
    self.session.step, self.session.wall_s = step, self._wall()
    self.seconds["other"] = 0.0
    self.seconds["other"] = self.session.wall_s - sum(self.seconds.values())

  def record(self, step: int, end: str | None = None):
    """Writes the session's file as of `step`; `end` says how it finished (None: still running)."""
    self._close_books(step)
    self.session.end = end
    if self.enabled:
      storage.write_atomic(self._dir / f"{self.session.name}.json", json.dumps(dataclasses.asdict(self.session)))

  def totals(self, step: int) -> dict:
    """The run's seconds per category as of now, this session included (its books closed at `step`)."""
    self._close_books(step)
    return account(self.previous + [self.session])


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt goodput`
# ----------------------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds / 3600:.2f} h"
  return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def format_table(sessions: list[Session]) -> str:
  totals = account(sessions)
  wall = sum(totals.values())
  last = max(s.step for s in sessions)
  restarts = len(sessions) - 1
  lines = [f"{len(sessions)} session(s) ({restarts} restart(s)), step {sessions[0].start_step} -> {last}, "
           f"wall {_duration(wall)} (from each process's start to its last record)",
           f"{'':12}{'seconds':>11}{'share':>8}  what"]
  for name in CATEGORIES:
    lines.append(f"{name:12}{totals[name]:11.1f}{100 * totals[name] / wall if wall else 0:7.1f}%  {EXPLAINED[name]}")
  lines.append(f"{'total':12}{wall:11.1f}{100.0:7.1f}%  goodput {100 * totals['train'] / wall if wall else 0:.1f}%")
  lines.append("")
  lines.append(f"{'session':38}{'steps':>14}{'wall s':>9}{'train s':>9}  ended")
  for i, s in enumerate(sessions):
    ended = s.end or ("running, or killed" if i == len(sessions) - 1 else "killed")
    lines.append(f"{s.name:38}{f'{s.start_step}->{s.step}':>14}{s.wall_s:9.1f}{s.seconds.get('train', 0):9.1f}"
                 f"  {ended}")
  return "\n".join(lines)


def define_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_workdir_flag(fv)
  flags.DEFINE_bool("json", False, "Print the totals and sessions as JSON.", flag_values=fv)


def main(fv):
  workdir = storage.usable(fv.workdir, what="--workdir")
  sessions = load(workdir)
  if not sessions:
    raise UserError(f"{workdir} has no {DIRECTORY}/ records: it was not trained by this version of pixelgpt train")
  if fv.json:
    totals = account(sessions)
    print(json.dumps({"totals": totals, "metrics": metrics(totals),
                      "sessions": [dataclasses.asdict(s) for s in sessions]}))
  else:
    print(format_table(sessions))
