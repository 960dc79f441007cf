"""Profiles of train steps: the trainer records a JAX profiler trace of `config.profile_steps` steps into
W/profile/plugins/profile/<run>/ (the layout `xprof W/profile` and TensorBoard's profile plugin read), beside the
compiled step's HLO; `pixelgpt profile --workdir W` summarises it in the terminal.

The trace is written to local disk first and copied into the workdir when it stops: the profiler writes through
XLA's own file system layer, which need not reach an object store that epath does.
"""

import collections
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile

from absl import flags
import jax

from pixelgpt import hlo
from pixelgpt import storage
from pixelgpt.errors import UserError

DIRECTORY = "profile"
HLO_FILE = "train_step.hlo.txt"
STEP_FILE = "steps.json"
# The trainer wraps each wait on its input pipeline in this annotation; the summary sums it.
DATA_WAIT = "pixelgpt/data_wait"
COLLECTIVE_OPCODES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                      "collective-broadcast", "send", "recv")
# Control flow: its trace events enclose its body's ops, which are counted themselves.
CONTROL_OPCODES = ("while", "conditional", "call")
# Kernels that are attention whatever scope they sit in (Pallas splash, cuDNN flash).
ATTENTION_KERNELS = re.compile(r"splash|flash|cudnn.*(fmha|attention)|mha", re.IGNORECASE)


def runs_directory(workdir):
  return storage.path(workdir) / DIRECTORY / "plugins" / "profile"


class Tracer:
  """Starts the profiler before step `first` and stops it after step `last` of this session (steps are the
  trainer's, 1-based), then copies the trace into the workdir."""

  def __init__(self, config, workdir, *, start_step: int, end_step: int):
    n = config.profile_steps
    first = config.profile_start_step or start_step + 2
    self.first, self.last = first, min(first + n - 1, end_step)
    self.enabled = bool(n) and start_step < first <= end_step and (
        config.profile_all_hosts or jax.process_index() == 0)
    self._workdir, self._local = workdir, None

  def before(self, step: int):
    if self.enabled and step == self.first:
      self._local = tempfile.mkdtemp(prefix="pixelgpt-profile-")
      jax.profiler.start_trace(self._local)

  def stopping(self, step: int) -> bool:
    return self.enabled and step == self.last and self._local is not None

  def stop(self, compiled) -> str:
    """Stops the trace (the caller has waited for the last traced step) and copies it, with the compiled step's
    HLO, to W/profile; returns where it went."""
    jax.profiler.stop_trace()
    (run,) = os.listdir(os.path.join(self._local, "plugins", "profile"))
    source = os.path.join(self._local, "plugins", "profile", run)
    # Named by its steps, not by each host's clock: every host's trace of the same steps lands in one run.
    target = runs_directory(self._workdir) / f"steps_{self.first:07d}-{self.last:07d}"
    target.mkdir(parents=True, exist_ok=True)
    # Processes of one host would write the same <hostname>.xplane.pb: the process index keeps them apart.
    host = f"{socket.gethostname()}.p{jax.process_index()}"
    for name in os.listdir(source):
      suffix = name.split(".", 1)[1] if "." in name else name
      with open(os.path.join(source, name), "rb") as f:
        storage.write_atomic(target / f"{host}.{suffix}", f.read())
    if jax.process_index() == 0:
      storage.write_atomic(target / HLO_FILE, compiled.as_text())
      storage.write_atomic(target / STEP_FILE, json.dumps({"first": self.first, "last": self.last}))
    shutil.rmtree(self._local, ignore_errors=True)
    self._local = None
    return os.fspath(target)


# ----------------------------------------------------------------------------------------------------------------
# Reading a trace
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Op:
  name: str
  category: str  # matmul, attention, collective, other
  count: int = 0
  seconds: float = 0.0


def classify(hlo_text: str) -> dict[str, str]:
  """{instruction name: category} for the compiled step: control flow (not counted); a collective by opcode;
  attention when a kernel is one or the instruction came from the model's `attn` scope other than its q/k/v/out
  projections; matmul when it is (or fuses) a dot or convolution; other otherwise."""
  computations, _ = hlo.parse(hlo_text)
  has_dot = {name: any(i.opcode in ("dot", "convolution") for i in body) for name, body in computations.items()}
  categories = {}
  for body in computations.values():
    for i in body:
      called = re.findall(r"calls=%?([\w.\-]+)", i.attributes)
      op_name = (re.search(r'op_name="([^"]*)"', i.attributes) or [None, ""])[1]
      target = (re.search(r'custom_call_target="([^"]*)"', i.attributes) or [None, ""])[1]
      if i.opcode in CONTROL_OPCODES:
        categories[i.name] = "control"
      elif i.opcode.removesuffix("-start").removesuffix("-done") in COLLECTIVE_OPCODES:
        categories[i.name] = "collective"
      elif ATTENTION_KERNELS.search(target + " " + i.name) or re.search(
          r"/attn/(?!(query|key|value|out)/)", op_name):
        categories[i.name] = "attention"
      elif i.opcode in ("dot", "convolution") or any(has_dot.get(c) for c in called):
        categories[i.name] = "matmul"
      else:
        categories[i.name] = "other"
  return categories


def _op_events(profile):
  """(op name, start ns, duration ns) of every XLA op the trace holds: on CPU the thunk events that carry an
  `hlo_op` stat; on TPU and GPU the device planes' "XLA Ops" lines, named by the op."""
  for plane in profile.planes:
    device = plane.name.startswith("/device:")
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          yield str(stats["hlo_op"]), event.start_ns, event.duration_ns
        elif device and line.name == "XLA Ops":
          yield event.name, event.start_ns, event.duration_ns


def summarise(xplane: bytes, hlo_text: str, steps: int, top: int = 15) -> dict:
  """Op time by category and the top ops from one host's trace; input waiting as a share of the traced wall."""
  profile = jax.profiler.ProfileData.from_serialized_xspace(xplane)
  categories = classify(hlo_text)
  ops: dict[str, Op] = {}
  begin, end = float("inf"), 0.0
  for name, start, duration in _op_events(profile):
    if categories.get(name) == "control":
      continue
    op = ops.setdefault(name, Op(name, categories.get(name, "other")))
    op.count += 1
    op.seconds += duration * 1e-9
    begin, end = min(begin, start), max(end, start + duration)
  waits = [(e.start_ns, e.duration_ns) for plane in profile.planes for line in plane.lines for e in line.events
           if e.name == DATA_WAIT]
  for start, duration in waits:
    begin, end = min(begin, start), max(end, start + duration)
  if not ops:
    raise UserError("the trace holds no XLA op events (was it recorded by `pixelgpt train` with "
                    "--config.profile_steps?)")
  wall = (end - begin) * 1e-9
  total = sum(op.seconds for op in ops.values())
  by_category = collections.Counter()
  for op in ops.values():
    by_category[op.category] += op.seconds
  ranked = sorted(ops.values(), key=lambda o: -o.seconds)[:top]
  return {
      "steps": steps, "wall_s": wall, "op_s": total,
      "categories": {c: by_category.get(c, 0.0) for c in ("matmul", "attention", "collective", "other")},
      "data_wait_s": sum(d for _, d in waits) * 1e-9,
      "top": [dataclasses.asdict(op) for op in ranked],
  }


def format_summary(s: dict, source: str) -> str:
  lines = [f"{source}: {s['steps']} step(s) traced, {s['wall_s']:.3f} s wall "
           f"({1e3 * s['wall_s'] / s['steps']:.1f} ms/step); op time {s['op_s']:.3f} s summed over devices and "
           f"threads"]
  lines.append("share of op time:")
  for name, seconds in s["categories"].items():
    lines.append(f"  {name:11}{100 * seconds / s['op_s']:6.1f}%  {seconds:8.3f} s")
  lines.append(f"input waiting: {100 * s['data_wait_s'] / s['wall_s']:.1f}% of the traced wall time "
               f"({s['data_wait_s'] * 1e3:.1f} ms)")
  lines.append(f"top {len(s['top'])} ops by time:")
  lines.append(f"  {'op':40}{'category':>11}{'count':>7}{'ms':>10}{'share':>8}")
  for op in s["top"]:
    lines.append(f"  {op['name'][:40]:40}{op['category']:>11}{op['count']:7d}{1e3 * op['seconds']:10.2f}"
                 f"{100 * op['seconds'] / s['op_s']:7.1f}%")
  return "\n".join(lines)


def read(workdir, run: str | None = None, host: str | None = None, top: int = 15) -> tuple[dict, str]:
  """The summary of trace `run` (default: the latest steps traced) of `host` (default: process 0's), and its
  path."""
  runs = runs_directory(workdir)
  names = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
  if not names:
    raise UserError(f"{storage.path(workdir)} has no profile: train with --config.profile_steps=N first")
  if run is not None and run not in names:
    raise UserError(f"no profile run {run!r} in {runs} (runs: {', '.join(names)})")
  directory = runs / (run or names[-1])
  traces = sorted(p.name for p in directory.glob("*.xplane.pb"))
  if not traces:
    raise UserError(f"{directory} holds no .xplane.pb trace")
  chosen = [t for t in traces if t.startswith(host)] if host else [t for t in traces if ".p0." in t] or traces[:1]
  if not chosen:
    raise UserError(f"no trace of host {host!r} in {directory} (traces: {', '.join(traces)})")
  meta = json.loads((directory / STEP_FILE).read_text()) if (directory / STEP_FILE).exists() else {}
  text = (directory / HLO_FILE).read_text() if (directory / HLO_FILE).exists() else ""
  steps = meta.get("last", 0) - meta.get("first", 0) + 1 if meta else 1
  return summarise((directory / chosen[0]).read_bytes(), text, steps, top), os.fspath(directory / chosen[0])


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt profile`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_workdir_flag(fv)
  flags.DEFINE_string("run", None, "Which trace under W/profile/plugins/profile (default: the latest steps).",
                      flag_values=fv)
  flags.DEFINE_string("host", None, "Whose trace, by file name prefix (default: process 0's).", flag_values=fv)
  flags.DEFINE_integer("top", 15, "How many ops to list.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print the summary as JSON.", flag_values=fv)


def main(fv):
  summary, source = read(storage.usable(fv.workdir, what="--workdir"), fv.run, fv.host, fv.top)
  print(json.dumps(summary) if fv.json else format_summary(summary, source))
