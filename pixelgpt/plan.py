"""`pixelgpt plan`: the fastest layout of a config on a TPU topology, chosen from compiled programs, not guesses.

It enumerates meshes (data × fsdp × tensor within a slice, data across slices), remat policies and global batch
sizes; refuses, without compiling, meshes whose batch cannot be fed or that cannot split the model; compiles the
rest through libtpu (compile.py) in order of promise, each once (reports are cached on disk by config, topology
and the versions that compiled them); skips a candidate whose lower bound on step time cannot beat the best
estimate so far; and ranks what fits by estimated tokens/s (estimate.py: an estimate, labelled so).

The lower bound of a candidate is max(its matmul FLOPs at the chip's peak, the bytes its mesh must move at the
chip's whole ICI bandwidth): FSDP gathers every weight shard once and reduce-scatters its gradient once, data
parallelism all-reduces the gradient, remat 'full' runs the forward pass twice. Once a layout is compiled, its
siblings (the same remat, batch and tensor width, the data-parallel devices split otherwise between data and
fsdp) run the same local program: their bound rises to 95% of its max(compute, HBM) time.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import sys

from absl import flags
from tqdm import tqdm

from pixelgpt import compile as compile_lib
from pixelgpt import config as config_lib
from pixelgpt import estimate as estimate_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import storage
from pixelgpt import sweep
from pixelgpt.errors import UserError

# Forward passes per step relative to no remat: 'full' recomputes the block forward in the backward pass.
_FORWARD_PASSES = {"none": 1.0, "dots": 1.0, "dots_no_batch": 1.0, "full": 4.0 / 3.0}
# A sibling layout's compute and HBM time is taken as at least this share of a compiled one's (see plan()).
SIBLING_TOLERANCE = 0.95
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pixelgpt", "compile")


@dataclasses.dataclass
class Candidate:
  data: int
  fsdp: int
  tensor: int
  remat: str
  batch_size: int
  status: str = "pending"  # compiled | cached | skipped: ... | refused: ... | does not fit: ...
  bound_tokens_per_sec: float = math.inf
  report: dict | None = None

  @property
  def overrides(self) -> dict:
    return {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor, "model.remat": self.remat,
            "batch_size": self.batch_size}

  @property
  def tokens_per_sec(self) -> float:
    e = self.report and self.report.get("estimate")
    return e["tokens_per_sec"] if e and self.report["fits"] else 0.0

  def flags(self) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in self.overrides.items())


def _powers_of_two_dividing(n: int) -> list[int]:
  return [2 ** k for k in range(int(math.log2(n)) + 1) if n % 2 ** k == 0]


def candidates(config, topology: compile_lib.Topology, batch_sizes: list[int], remats: list[str]) -> list[Candidate]:
  """Every layout of the slice's devices (power-of-two axes, as TPU slices have), with each remat and batch."""
  per_slice = topology.num_devices // topology.num_slices
  out = []
  for tensor in _powers_of_two_dividing(per_slice):
    for fsdp in _powers_of_two_dividing(per_slice // tensor):
      for remat in remats:
        for batch in batch_sizes:
          out.append(Candidate(per_slice // (tensor * fsdp), fsdp, tensor, remat, batch))
  return out


def refusal(config, c: Candidate, num_slices: int) -> str | None:
  """Why a candidate cannot run, decided without compiling, or None."""
  m = config.model
  shards = c.data * c.fsdp * num_slices
  if c.batch_size % shards:
    return f"refused: batch {c.batch_size} does not split into {shards} data-parallel shards"
  if m.n_head % c.tensor or (m.d_model * m.mlp_ratio) % c.tensor or config.palette.size % c.tensor:
    return f"refused: tensor={c.tensor} does not split the heads, MLP or palette"
  if m.d_model % c.fsdp:
    return f"refused: fsdp={c.fsdp} does not split d_model={m.d_model}"
  return None


def lower_bound_s(config, c: Candidate, topology: compile_lib.Topology, params: int) -> float:
  """No compiled program of this candidate takes less: its matmuls at peak, or the bytes its mesh must move."""
  chip = estimate_lib.CHIPS.get(topology.generation.name)
  if chip is None:
    return 0.0
  g = topology.generation
  peak = chip.peak_flops / g.devices_per_chip
  model_cfg = model_lib.ModelConfig.from_config(config_lib.override(config, c.overrides))
  tokens = c.batch_size * model_cfg.seq_len
  compute = metrics_lib.flops_per_token(model_cfg) * tokens * _FORWARD_PASSES[c.remat] / (
      topology.num_devices * peak)
  # Weight bytes each device gathers (bf16) and gradient bytes it reduces, on every link of its chip at once.
  shard = 2.0 * params / c.tensor
  moved = 2 * shard * (c.fsdp - 1) / c.fsdp + 2 * shard / c.fsdp * (c.data - 1) / c.data
  links = 2 * len(topology.torus)
  return max(compute, moved / (links * 2 * chip.ici_link / g.devices_per_chip))


@functools.lru_cache(maxsize=1)
def _compiler_identity() -> str:
  """jax, jaxlib and libtpu versions and a hash of pixelgpt's own source: what a cached report was compiled with.
  Read once per process (a plan asks for every candidate)."""
  versions = []
  for package in ("jax", "jaxlib", "libtpu"):
    try:
      versions.append(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
      versions.append("-")
  source = hashlib.sha256()
  package_dir = os.path.dirname(os.path.abspath(__file__))  # the installed package: always local
  for name in sorted(os.listdir(package_dir)):
    if name.endswith(".py"):
      with open(os.path.join(package_dir, name), "rb") as f:
        source.update(f.read())
  return json.dumps([versions, source.hexdigest()])


def _cache_key(config, topology: compile_lib.Topology) -> str:
  text = json.dumps([config_lib.to_json(config), topology.name, topology.num_slices, _compiler_identity()])
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_cached(config, topology: compile_lib.Topology, cache_dir: str | None = CACHE_DIR) -> tuple[dict, bool]:
  """(the compile report, whether it came from the cache). The cache may be on gs:// like any user path."""
  path = storage.path(cache_dir) / f"{_cache_key(config, topology)}.json" if cache_dir else None
  if path and path.exists():
    return json.loads(path.read_text()), True
  report = compile_lib.compile_train_step(config, topology)
  if path:
    storage.write_atomic(path, json.dumps(report))
  return report, False


def plan(config, topology: compile_lib.Topology, *, batch_sizes: list[int], remats: list[str],
         cache_dir: str | None = CACHE_DIR, progress: bool = True) -> list[Candidate]:
  """Every candidate, ranked: estimated tokens/s of those that fit first, then the rest with why."""
  everything = candidates(config, topology, batch_sizes, remats)
  params = sweep.param_counts(config)[1]  # the same for every layout
  tokens = config_lib.seq_len(config)
  runnable = []
  for c in everything:
    c.status = refusal(config, c, topology.num_slices) or "pending"
    if c.status == "pending":
      bound = lower_bound_s(config, c, topology, params)
      c.bound_tokens_per_sec = c.batch_size * tokens / bound if bound else math.inf
      runnable.append(c)
  runnable.sort(key=lambda c: -c.bound_tokens_per_sec)  # the most promising first: later ones often cannot win
  best, roofs = 0.0, {}
  bar = tqdm(runnable, desc=f"plan {topology.name}", unit="candidate", disable=not progress, file=sys.stderr)
  for c in bar:
    # Layouts that differ only in how data and fsdp split the same data-parallel devices run the same local
    # program (same batch rows, same weight shards after gathering): their compute and HBM time is a compiled
    # sibling's, within the few percent the gathered buffers change; only their collectives differ, which can
    # only add time.
    roof = roofs.get((c.remat, c.batch_size, c.tensor))
    if roof:
      c.bound_tokens_per_sec = min(c.bound_tokens_per_sec, c.batch_size * tokens / (SIBLING_TOLERANCE * roof))
    if c.bound_tokens_per_sec <= best:
      c.status = f"skipped: at most {c.bound_tokens_per_sec:,.0f} tokens/s (lower bound), best {best:,.0f}"
      continue
    try:
      c.report, cached = compile_cached(config_lib.override(config, c.overrides), topology, cache_dir)
    except UserError as e:
      c.status = f"refused: {e}"
      continue
    c.status = ("cached" if cached else "compiled") if c.report["fits"] else f"does not fit: {c.report['reason']}"
    e = c.report.get("estimate")
    if e and c.report["fits"]:
      key = (c.remat, c.batch_size, c.tensor)
      roofs[key] = min(roofs.get(key, math.inf), max(e["compute_s"], e["hbm_s"]))
    best = max(best, c.tokens_per_sec)
    bar.set_postfix(best=f"{best:,.0f} tokens/s")
  return sorted(everything, key=lambda c: (-c.tokens_per_sec, -c.bound_tokens_per_sec))


def candidate_row(c: Candidate) -> dict:
  r, e = c.report or {}, (c.report or {}).get("estimate") or {}
  return {"overrides": c.overrides, "flags": c.flags(), "status": c.status, "fits": r.get("fits"),
          "per_device_bytes": (r.get("per_device_bytes") or {}).get("total"),
          "tokens_per_sec_bound": c.bound_tokens_per_sec if math.isfinite(c.bound_tokens_per_sec) else None,
          "estimate": {k: v for k, v in e.items() if k != "chip"} if e else None}


def format_table(ranked: list[Candidate], topology: compile_lib.Topology) -> str:
  lines = [f"plan for {topology.name}" + (f" × {topology.num_slices} slices" if topology.num_slices > 1 else "")
           + " (step times are estimates from the compiled programs, not measurements)",
           f"{'#':>3} {'data×fsdp×tensor':>17} {'remat':>13} {'batch':>6} {'GiB/dev':>8} {'step ms':>9} "
           f"{'tokens/s':>13} {'MFU':>5} {'bound':>7}  status"]
  for i, c in enumerate(ranked, 1):
    e = (c.report or {}).get("estimate")
    memory = (c.report or {}).get("per_device_bytes")
    fits = c.tokens_per_sec > 0
    lines.append(f"{i if fits else '-':>3} {f'{c.data}×{c.fsdp}×{c.tensor}':>17} {c.remat:>13} {c.batch_size:>6} "
                 f"{memory['total'] / 2**30 if memory else math.nan:>8.2f} "
                 f"{1e3 * e['step_s'] if e else math.nan:>9.1f} {c.tokens_per_sec:>13,.0f} "
                 f"{e['mfu'] if e else math.nan:>5.0%} {e['bottleneck'] if e else '':>7}  {c.status}")
  if ranked and ranked[0].tokens_per_sec:
    lines.append(f"best (estimated): {ranked[0].flags()}")
  else:
    lines.append("no candidate fits")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt plan`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_config_flag(fv)
  flags.DEFINE_string("topology", None, "Cloud TPU accelerator type of one slice: v5p-2048, v5e-256, ...",
                      flag_values=fv)
  flags.DEFINE_integer("num_slices", None, "Slices joined over DCN (default: config.mesh.dcn_data).", flag_values=fv)
  flags.DEFINE_list("batch_sizes", None, "Global batch sizes to try: a list (128,256) or a range of powers of two "
                    "(128-1024). Default: the config's.", flag_values=fv)
  flags.DEFINE_list("remat", None, "Remat policies to try (default: the config's and 'full'; each one adds a "
                    "compile per layout).", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.", flag_values=fv)
  flags.DEFINE_string("cache_dir", CACHE_DIR, "Where compile reports are cached ('' for no cache).", flag_values=fv)


def parse_batch_sizes(values: list[str] | None, default: int) -> list[int]:
  """'128,256' or '128-1024' (the powers of two between) -> [128, 256, ...]; UserError otherwise."""
  if not values:
    return [default]
  sizes = []
  for value in values:
    low, dash, high = value.partition("-")
    try:
      lo, hi = int(low), int(high) if dash else int(low)
    except ValueError:
      raise UserError(f"--batch_sizes takes numbers or ranges such as 128-1024, got {value!r}") from None
    if lo <= 0 or hi < lo:
      raise UserError(f"--batch_sizes must be positive and ranges increasing, got {value!r}")
    sizes += [lo] if not dash else [b for b in (2 ** k for k in range(31)) if lo <= b <= hi]
  return sorted(set(sizes))


def main(fv):
  config = fv.config
  remats = list(dict.fromkeys(fv.remat or [config.model.remat, "full"]))
  unknown = [r for r in remats if r not in config_lib.REMAT_POLICIES]
  if unknown:
    raise UserError(f"--remat takes {', '.join(config_lib.REMAT_POLICIES)}; got {', '.join(unknown)}")
  num_slices = config.mesh.dcn_data if fv.num_slices is None else fv.num_slices
  config = config_lib.override(config, {"mesh.dcn_data": num_slices})
  topology = compile_lib.parse_topology(fv.topology, num_slices)
  ranked = plan(config, topology, batch_sizes=parse_batch_sizes(fv.batch_sizes, config.batch_size),
                remats=remats, cache_dir=fv.cache_dir or None)
  if fv.json:
    rows = [candidate_row(c) for c in ranked]
    print(json.dumps({"topology": topology.name, "num_slices": num_slices, "candidates": rows,
                      "best": rows[0] if ranked and ranked[0].tokens_per_sec else None}))
  else:
    print(format_table(ranked, topology))
  if not (ranked and ranked[0].tokens_per_sec):
    sys.exit(1)
