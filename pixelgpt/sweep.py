"""`pixelgpt sweep`: a sweep file (a base config and a grid of overrides) -> one run per grid point, trained here or
launched on Cloud TPU -> R/results.csv and R/results.md -> a scaling-law fit L = E + A·X^-alpha and log-log plots.

A sweep file is Python with `get_sweep()` returning
  {"base": ConfigDict, "product": {"model.d_model": [64, 128]},
   "zip": {"model.n_layer": [2, 4], "model.n_head": [2, 4]}}
where every `product` list is crossed with every other and with the `zip` rows (the zip lists go together, one row
per index); both are optional. Each run is named after its overrides (`d_model=64-n_layer=2-n_head=2`) and trains
in WORKDIR_ROOT/<name>. This module is also a config file for one run of a sweep, which is how TPU workers get it:
  pixelgpt train --config pixelgpt/sweep.py:configs/sweeps/F.py:RUN_NAME --workdir W
"""

import csv
import dataclasses
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import time
import warnings

from absl import flags
from etils import epath
import jax
import ml_collections
import numpy as np
import optax

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import config as config_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import storage
from pixelgpt import train
from pixelgpt.data import sources
from pixelgpt.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = ("base", "product", "zip")
RUN_FILE = "sweep.json"  # in each run's workdir: the wall time the local launcher measured
# The scaling laws fitted: (file suffix, results column, axis label, symbol in the fitted formula).
FITS = (("params", "params_non_embedding", "non-embedding parameters", "N"),
        ("compute", "train_flops", "training compute (FLOPs)", "C"))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict  # {dotted key: value}, in the sweep file's key order
  config: ml_collections.ConfigDict
  workdir: str


# ----------------------------------------------------------------------------------------------------------------
# Sweep files -> runs.
# ----------------------------------------------------------------------------------------------------------------
def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> dict:
  """The dict that `get_sweep()` in the Python file `path` returns, checked for shape (not yet for values)."""
  if not os.path.isfile(path):
    raise UserError(f"sweep file not found: {path}")
  try:
    sweep = _load_module(path, "pixelgpt_sweep_file").get_sweep()
  except Exception as e:  # pylint: disable=broad-except  (a broken sweep file is the user's mistake: one line)
    raise UserError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  if not isinstance(sweep, dict) or not isinstance(sweep.get("base"), ml_collections.ConfigDict):
    raise UserError(f"{path}: get_sweep() must return a dict with 'base': a ConfigDict")
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  if unknown:
    raise UserError(f"{path}: unknown sweep keys {unknown}: use {list(SWEEP_KEYS)}")
  for part in ("product", "zip"):
    grid = sweep.get(part, {})
    if not isinstance(grid, dict) or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
      raise UserError(f"{path}: '{part}' must map config keys to non-empty lists of values")
  lengths = {key: len(values) for key, values in sweep.get("zip", {}).items()}
  if len(set(lengths.values())) > 1:
    raise UserError(f"{path}: 'zip' lists must have equal lengths, got {lengths}")
  both = sorted(set(sweep.get("product", {})) & set(sweep.get("zip", {})))
  if both:
    raise UserError(f"{path}: keys in both 'product' and 'zip': {both}")
  return sweep


def grid(sweep: dict) -> list[dict]:
  """Every grid point's overrides: the product of the `product` lists, each crossed with every `zip` row."""
  product, zipped = sweep.get("product", {}), sweep.get("zip", {})
  rows = list(zip(*zipped.values())) or [()]
  return [{**dict(zip(product, p)), **dict(zip(zipped, z))}
          for p in itertools.product(*product.values()) for z in rows]


def _format_value(value) -> str:
  text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
  return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)  # a path component on any file system, and a shell word


def run_name(overrides: dict) -> str:
  """`d_model=64-n_layer=2`: each key by its last part, or in full where two keys share that part."""
  leaves = [key.rsplit(".", 1)[-1] for key in overrides]
  labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(overrides, leaves)]
  return "-".join(f"{label}={_format_value(v)}" for label, v in zip(labels, overrides.values())) or "base"


def _apply(base, overrides: dict, name: str) -> ml_collections.ConfigDict:
  for key in overrides:
    try:
      is_leaf = not isinstance(config_lib.get(base, key), ml_collections.ConfigDict)
    except (KeyError, AttributeError, TypeError):
      is_leaf = False
    if not is_leaf:  # ConfigDict would silently add a misspelt key
      raise UserError(f"run {name}: {key!r} is not a config key (e.g. model.d_model)")
  try:
    config = config_lib.override(base, overrides)
  except TypeError as e:  # ConfigDict keeps each key's type
    raise UserError(f"run {name}: {str(e).splitlines()[0]}") from None
  try:
    config_lib.validate(config)
  except UserError as e:
    raise UserError(f"run {name}: {e}") from None
  return config


def expand(sweep: dict, workdir_root: str) -> list[Run]:
  """The sweep's runs, each config validated; names (hence workdirs) must differ."""
  runs = []
  for overrides in grid(sweep):
    name = run_name(overrides)
    workdir = os.fspath(epath.Path(workdir_root) / name)
    runs.append(Run(name, overrides, _apply(sweep["base"], overrides, name), workdir))
  names = [r.name for r in runs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise UserError(f"the grid names two runs alike ({', '.join(repeated)}): values must differ once sanitized")
  return runs


def get_config(spec: str) -> ml_collections.ConfigDict:
  """`SWEEP_FILE:RUN_NAME` -> that run's config: this module serves as the config file of a sweep's runs."""
  path, _, name = spec.rpartition(":")
  by_name = {r.name: r for r in expand(load_sweep(path), "")}
  if name not in by_name:
    raise UserError(f"{path} has no run {name!r} (runs: {', '.join(by_name)})")
  return by_name[name].config


# ----------------------------------------------------------------------------------------------------------------
# A run's state and results, read from its workdir (a local path or gs://).
# ----------------------------------------------------------------------------------------------------------------
def read_status(run: Run) -> dict:
  """{'checkpoint': latest finished (committed) checkpoint or None, 'final': the metrics line (with eval/loss) at
  total_steps or None, 'last': the last metrics line, 'probe': probe.json, 'wall_s': the local launcher's measured
  seconds, 'finished': a checkpoint and final metrics at total_steps}."""
  w = storage.usable(run.workdir, what="--workdir_root")
  steps = ckpt_lib.finished_steps(w)
  lines = metrics_lib.read_metrics(w)
  probe = json.loads((w / "probe.json").read_text()) if (w / "probe.json").exists() else None
  ours = json.loads((w / RUN_FILE).read_text()) if (w / RUN_FILE).exists() else {}
  total = run.config.total_steps
  final = next((m for m in reversed(lines) if m["step"] == total and "eval/loss" in m), None)
  checkpoint = max(steps, default=None)
  return {"checkpoint": checkpoint, "final": final, "probe": probe, "wall_s": ours.get("wall_s"),
          "finished": checkpoint == total and final is not None, "last": lines[-1] if lines else None}


def param_counts(config) -> tuple[int, int]:
  """(non-embedding, total) parameters of the config's model, from shapes alone (nothing is allocated)."""
  model = model_lib.Transformer(model_lib.ModelConfig.from_config(config))
  init = train.make_init_fn(model, optax.identity(), config_lib.seq_len(config))
  params = jax.eval_shape(init, jax.random.key(0)).params
  return model_lib.count_params(params, exclude_embeddings=True), model_lib.count_params(params)


def result_row(run: Run, status: dict) -> dict:
  """One results.csv row: the run's overrides, size, data and compute seen, losses, probe accuracy, wall time."""
  non_embedding, total = param_counts(run.config)
  last = status["last"] or {}
  step = int(last.get("step", 0))
  tokens = step * run.config.batch_size * config_lib.seq_len(run.config)
  final = status["final"] or {}
  probe = status["probe"] or {}
  return {"name": run.name, **run.overrides, "finished": status["finished"], "step": step,
          "params_non_embedding": non_embedding, "params_total": total, "tokens": tokens,
          "train_flops": metrics_lib.flops_per_token(model_lib.ModelConfig.from_config(run.config)) * tokens,
          "train_loss": final.get("train/loss", last.get("train/loss")), "eval_loss": final.get("eval/loss"),
          "probe_accuracy": probe.get("test_accuracy"), "wall_s": status["wall_s"], "workdir": run.workdir}


# ----------------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------------
def train_local(runs: list[Run], statuses: dict, *, dry_run: bool) -> None:
  """Trains the unfinished runs one after another in this process; each resumes from its last checkpoint."""
  for i, run in enumerate(runs, 1):
    status = statuses[run.name]
    where = "from scratch" if status["checkpoint"] is None else f"from step {status['checkpoint']}"
    if status["finished"]:
      print(f"pixelgpt sweep: [{i}/{len(runs)}] {run.name}: finished, skipped")
      continue
    print(f"pixelgpt sweep: [{i}/{len(runs)}] {run.name}: {'would train' if dry_run else 'training'} {where} "
          f"-> {run.workdir}", flush=True)
    if dry_run:
      continue
    start = time.perf_counter()
    train.run(run.config, run.workdir)
    # Wall time adds up over the sessions that trained the run (an interrupted sweep resumes it).
    wall_s = (status["wall_s"] or 0.0) + time.perf_counter() - start
    storage.write_atomic(storage.path(run.workdir) / RUN_FILE,
                         json.dumps({"name": run.name, "overrides": run.overrides, "wall_s": wall_s}, indent=2))


@functools.cache
def _tpu_launcher():
  path = os.path.join(REPO, "launch", "tpu.py")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: --launcher tpu runs from a pixelgpt checkout")
  return _load_module(path, "launch_tpu")


def tpu_name(sweep_path: str, run: Run) -> str:
  """A Compute Engine name (lowercase letters, digits, hyphens; at most 63) unique to the sweep and run."""
  stem = os.path.splitext(os.path.basename(sweep_path))[0]
  name = re.sub(r"[^a-z0-9]+", "-", f"{stem}-{run.name}".lower()).strip("-")
  name = name if name[:1].isalpha() else f"run-{name}"
  if len(name) > 63:  # keep it unique: a hash of the full name replaces the cut-off tail
    name = f"{name[:54].rstrip('-')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
  return name


def tpu_plan(runs: list[Run], sweep_path: str, fv) -> dict:
  """{run name: the `launch/tpu.py up` commands of its own TPU}, every launch option checked; the workers rebuild
  the run's config from the sweep file in their copy of the checkout."""
  tpu = _tpu_launcher()
  relative = os.path.relpath(os.path.abspath(sweep_path), REPO)
  if relative.startswith(".."):
    raise UserError(f"--launcher tpu: the sweep file must be inside the checkout {REPO} (the workers get a copy)")
  options = dict(zone=fv.zone, accelerator=fv.accelerator_type, capacity=fv.capacity, project=fv.project)
  names = [tpu_name(sweep_path, run) for run in runs]
  if len(set(names)) < len(names):
    raise UserError(f"runs of {sweep_path} share a TPU name once lowercased: {names}")
  try:
    return {run.name: tpu.commands_for("up", name=name, workdir=run.workdir,
                                       config=f"pixelgpt/sweep.py:{relative}:{run.name}", **options)
            for run, name in zip(runs, names)}
  except tpu.LaunchError as e:
    raise UserError(str(e)) from None


def launch_tpu(runs: list[Run], plan: dict, statuses: dict, *, dry_run: bool, zone: str) -> None:
  """Launches each unfinished run (in a dry run, which reads nothing, prints every run's commands)."""
  tpu = _tpu_launcher()
  launched = 0
  for run in runs:
    if statuses.get(run.name, {}).get("finished"):
      print(f"pixelgpt sweep: {run.name}: finished, skipped")
      continue
    print(f"# {run.name} -> {run.workdir}", flush=True)
    try:
      tpu.execute(plan[run.name], dry_run=dry_run)
    except tpu.LaunchError as e:
      raise UserError(f"launching {run.name}: {e} (a TPU that still exists: wait for its run, or delete it "
                      "after a preemption)") from None
    launched += 1
  if launched and not dry_run:
    print(f"pixelgpt sweep: launched {launched} run(s); delete each TPU when its run is done (python launch/tpu.py "
          f"delete --name NAME --zone {zone}), then rerun this command to collect the results")


# ----------------------------------------------------------------------------------------------------------------
# Scaling law: L = E + A·X^-alpha.
# ----------------------------------------------------------------------------------------------------------------
def fit_power_law(x, loss) -> dict:
  """Least squares in log L (every run weighs by its relative error) of L = E + A·X^-alpha, 0 <= E < min L.

  Returns E, A, alpha and their standard errors (from the covariance; inf with exactly 3 points, when nothing is
  left to estimate the noise). Raises ValueError with a one-line reason when no fit is possible.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top  (scipy comes with scikit-learn)
  x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
  if len(x) < 3:
    raise ValueError(f"{len(x)} finished run(s), a fit needs at least 3")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(loss)) and np.all(x > 0) and np.all(loss > 0)):
    raise ValueError("X and the losses must be finite and positive")
  if len(np.unique(x)) < 3:
    raise ValueError("a fit needs at least 3 distinct values of X")
  x0 = math.exp(np.mean(np.log(x)))  # fit in u = log(X / x0): A becomes O(loss), well conditioned
  u, log_loss = np.log(x / x0), np.log(loss)

  def log_model(u, e, log_a, alpha):
    return np.log(e + np.exp(log_a - alpha * u))

  # Start from the best straight line in log(L - E) over a grid of E, then let all three move together.
  e_max = loss.min() * (1 - 1e-6)
  starts = []
  for e in loss.min() * np.linspace(0.0, 0.95, 20):
    slope, intercept = np.polyfit(u, np.log(loss - e), 1)
    p = (e, intercept, float(np.clip(-slope, 1e-3, 9.9)))
    starts.append((float(np.sum((log_model(u, *p) - log_loss) ** 2)), p))
  try:
    # With 3 runs the covariance is undefined: curve_fit warns and returns inf, reported as such.
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", optimize.OptimizeWarning)
      p, cov = optimize.curve_fit(log_model, u, log_loss, p0=min(starts)[1],
                                  bounds=([0.0, -50.0, 0.0], [e_max, 50.0, 10.0]))
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"curve_fit failed: {str(e).splitlines()[0]}") from None
  e, log_a, alpha = map(float, p)
  se = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.full(3, np.inf)
  return {"E": e, "A": math.exp(log_a) * x0 ** alpha, "alpha": alpha, "E_se": float(se[0]), "alpha_se": float(se[2]),
          "n": len(x)}


def describe_fit(fit: dict, symbol: str) -> str:
  se = f"{fit['alpha_se']:.3f}" if math.isfinite(fit["alpha_se"]) else "n/a (3 runs: no degrees of freedom left)"
  return f"L = {fit['E']:.3f} + {fit['A']:.3g}·{symbol}^-{fit['alpha']:.3f}, alpha = {fit['alpha']:.3f} ± {se}"


def plot_fit(x, loss, labels, fit: dict | None, path, xlabel: str) -> None:
  """Log-log PNG of final eval loss against X, each run labelled, with the fitted curve and E when there is a fit."""
  # pylint: disable=g-import-not-at-top  (only plotting needs matplotlib; a bare Figure renders through Agg)
  from matplotlib import ticker
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.6), dpi=110)
  ax = fig.subplots()
  ax.loglog(x, loss, "o", color="C0", label="runs (final eval loss)")
  for xi, li, label in zip(x, loss, labels):
    ax.annotate(label, (xi, li), textcoords="offset points", xytext=(4, 4), fontsize=6, color="0.3")
  if fit:
    xs = np.geomspace(min(x) / 1.5, max(x) * 1.5, 200)
    ax.plot(xs, fit["E"] + fit["A"] * xs ** -fit["alpha"], "--", color="C1",
            label=f"E + A·X^-α: α = {fit['alpha']:.3f}" + (f" ± {fit['alpha_se']:.3f}"
                                                            if math.isfinite(fit["alpha_se"]) else ""))
    if fit["E"] > 0:
      ax.axhline(fit["E"], linestyle=":", color="0.5", label=f"E = {fit['E']:.3f}")
  ax.set(xlabel=xlabel, ylabel="eval loss (nats/token)", title=f"final eval loss vs {xlabel}")
  ax.set_xlim(min(x) / 2, max(x) * 4)  # room for the labels on the right
  for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # losses span less than a decade
    axis(ticker.FormatStrFormatter("%.3g"))
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  storage.write_png(storage.path(path), lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------------------------------------------
# Results: R/results.csv, R/results.md, R/loss_vs_*.png.
# ----------------------------------------------------------------------------------------------------------------
def _human(n: float) -> str:
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{suffix}"
  return f"{n:.3g}"


def write_results(rows: list[dict], root, sweep_path: str) -> list[str]:
  """Writes the table and the fits; returns the lines that sum up the fits (also printed by the caller)."""
  root = storage.path(root)
  table_csv = io.StringIO(newline="")
  writer = csv.DictWriter(table_csv, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
  storage.write_atomic(root / "results.csv", table_csv.getvalue())

  done = [r for r in rows if r["finished"]]
  summary = []
  for short, column, xlabel, symbol in FITS:
    x, loss = [r[column] for r in done], [r["eval_loss"] for r in done]
    try:
      fit = fit_power_law(x, loss)
      summary.append(f"loss vs {xlabel}: {describe_fit(fit, symbol)}")
    except ValueError as e:
      fit = None
      summary.append(f"loss vs {xlabel}: no fit: {e}")
    if done:
      plot_fit(x, loss, [r["name"] for r in done], fit, root / f"loss_vs_{short}.png", xlabel)

  def cell(value, fmt):
    return "" if value is None else fmt.format(value)
  table = [f"# Sweep `{sweep_path}`", "",
           "| run | non-emb. params | params | tokens | train FLOPs | train loss | eval loss | probe acc. | wall (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    state = "" if r["finished"] else f" (step {r['step']}, unfinished)"
    probe = None if r["probe_accuracy"] is None else 100 * r["probe_accuracy"]
    cells = [r["name"] + state, _human(r["params_non_embedding"]), _human(r["params_total"]), _human(r["tokens"]),
             f"{r['train_flops']:.3g}", cell(r["train_loss"], "{:.4f}"), cell(r["eval_loss"], "{:.4f}"),
             cell(probe, "{:.1f}%"), cell(r["wall_s"], "{:.0f}")]
    table.append("| " + " | ".join(cells) + " |")
  table += ["", "Losses in nats/token (eval: held-out split at the last step). Fits of L = E + A·X^-alpha, "
            "least squares in log L:", ""] + [f"- {line}" for line in summary]
  table += [""] + [f"![loss vs {short}](loss_vs_{short}.png)" for short, *_ in FITS if done]
  storage.write_atomic(root / "results.md", "\n".join(table) + "\n")
  return summary


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt sweep`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/X.py) with get_sweep().", flag_values=fv)
  flags.DEFINE_string("root", None, "Directory for results.csv, results.md and the plots.", flag_values=fv)
  flags.DEFINE_string("workdir_root", None, "Run workdirs go to WORKDIR_ROOT/<run name> (default: ROOT/runs; "
                      "gs://BUCKET/PATH for --launcher tpu).", flag_values=fv)
  flags.DEFINE_enum("launcher", "local", ["local", "tpu"], "local: train the runs here one after another; tpu: "
                    "launch each on its own Cloud TPU through launch/tpu.py.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print what would run (for tpu: every gcloud command) and change nothing.",
                    flag_values=fv)
  flags.DEFINE_bool("probe", False, "Linear-probe each finished local run that has no probe.json yet.",
                    flag_values=fv)
  flags.DEFINE_integer("probe_train_examples", 0, "--probe on the first N training examples (0: all).",
                       flag_values=fv)
  flags.DEFINE_integer("probe_test_examples", 0, "--probe evaluates on the first N test examples (0: all).",
                       flag_values=fv)
  flags.DEFINE_string("zone", None, "tpu: zone offering the accelerator, e.g. us-central2-b.", flag_values=fv)
  flags.DEFINE_string("accelerator_type", None, "tpu: per run, e.g. v4-256.", flag_values=fv)
  flags.DEFINE_enum("capacity", None, ["spot", "reserved", "best-effort"], "tpu: capacity (default on-demand).",
                    flag_values=fv)
  flags.DEFINE_string("project", None, "tpu: GCP project (default: gcloud's).", flag_values=fv)


def _probe(runs: list[Run], statuses: dict, fv) -> None:
  from pixelgpt import evaluate  # pylint: disable=g-import-not-at-top  (only --probe needs it)
  from pixelgpt import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  for run in runs:
    if statuses[run.name]["finished"] and statuses[run.name]["probe"] is None:
      print(f"pixelgpt sweep: {run.name}: linear probe", flush=True)
      evaluate.linear_probe(workdir_lib.open_run(run.workdir), run.workdir, train_examples=fv.probe_train_examples,
                            test_examples=fv.probe_test_examples)


def main(fv):
  local = fv.launcher == "local"
  workdir_root = fv.workdir_root or os.fspath(epath.Path(fv.root) / "runs")
  if not local and not workdir_root.startswith("gs://"):
    raise UserError("--launcher tpu needs --workdir_root gs://BUCKET/PATH: every worker writes the same run")
  if fv.probe and not local:
    raise UserError("--probe runs here: use it with --launcher local (on a pod, run `pixelgpt probe` per run)")

  # Every run is checked before any starts: a mistake in the last grid point must not surface hours later.
  runs = expand(load_sweep(fv.sweep), workdir_root)
  if local:
    for dataset in {config_lib.to_json(r.config.dataset): r.config.dataset for r in runs}.values():
      for split in (dataset.train_split, dataset.eval_split):
        sources.get_source(dataset, split)  # raises the one-line error for missing data now
  else:
    plan = tpu_plan(runs, fv.sweep, fv)

  # A tpu dry run reads nothing (the bucket may not be reachable from here) and so prints every run.
  reads = local or not fv.dry_run
  statuses = {r.name: read_status(r) for r in runs} if reads else {}
  done = sum(s["finished"] for s in statuses.values())
  print(f"pixelgpt sweep: {len(runs)} runs from {fv.sweep}" + (f", {done} finished" if reads else ""))
  if local:
    train_local(runs, statuses, dry_run=fv.dry_run)
  else:
    launch_tpu(runs, plan, statuses, dry_run=fv.dry_run, zone=fv.zone)
  if fv.dry_run:
    return

  statuses = {r.name: read_status(r) for r in runs}
  if fv.probe:
    _probe(runs, statuses, fv)
    statuses = {r.name: read_status(r) for r in runs}
  summary = write_results([result_row(r, statuses[r.name]) for r in runs], fv.root, fv.sweep)
  for line in summary:
    print(f"pixelgpt sweep: {line}")
  root = storage.path(fv.root)
  print(f"pixelgpt sweep: results -> {root / 'results.csv'}, {root / 'results.md'}")
