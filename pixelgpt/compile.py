"""`pixelgpt compile`: ahead-of-time compile of the trainer's own train step for a TPU topology, on any machine.

libtpu describes the devices of a TPU slice (or several) without owning one, so a pod config is proven to fit in
HBM here, before a pod is rented, together with how many rows of each global batch every host of the pod must
decode; configs/pod.py:MODEL,TOPOLOGY builds the pod configs this command checks.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import flags
import jax

from pixelgpt import config as config_lib
from pixelgpt import estimate as estimate_lib
from pixelgpt import hlo
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import train as train_lib
from pixelgpt.errors import UserError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as in Cloud TPU accelerator types: v4, v5p, v5e, ...
  libtpu_name: str  # the generation in libtpu's topology names: 'v5' in 'v5:8x8x16' is v5p
  torus_dims: int
  name_units_per_chip: int  # Cloud TPU names count TensorCores (2 a chip) up to v5p, chips from v5e on
  devices_per_chip: int  # JAX devices: v2/v3 expose each TensorCore, v4/v5p fuse both into one megacore
  hbm_gib: int  # per JAX device


GENERATIONS = {
    "v2": Generation("v2", "v2", 2, 2, 2, 8),
    "v3": Generation("v3", "v3", 2, 2, 2, 16),
    "v4": Generation("v4", "v4", 3, 2, 1, 32),
    "v5p": Generation("v5p", "v5", 3, 2, 1, 95),
    "v5e": Generation("v5e", "v5e", 2, 1, 1, 16),
    "v6e": Generation("v6e", "v6e", 2, 1, 1, 32),
}
GENERATIONS["v5litepod"] = GENERATIONS["v5e"]  # v5e's name in gcloud


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # the Cloud TPU accelerator type a user types, e.g. 'v3-2048' (one slice)
  generation: Generation
  torus: tuple  # chips of one slice along each ICI axis, e.g. (32, 32)
  num_slices: int

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation.libtpu_name}:{'x'.join(map(str, self.torus))}"

  @property
  def num_devices(self) -> int:
    return math.prod(self.torus) * self.generation.devices_per_chip * self.num_slices


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v3-2048' -> 1024 v3 chips as a 32x32 torus; raises UserError for names Cloud TPU does not use."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  generation = GENERATIONS.get(match.group(1)) if match else None
  if generation is None or int(match.group(2)) % generation.name_units_per_chip:
    raise UserError(f"unknown TPU topology {name!r}: expected an accelerator type such as v3-8, v3-2048, v4-32, "
                    f"v5p-2048, v5e-256 (generations {', '.join(GENERATIONS)})")
  chips = int(match.group(2)) // generation.name_units_per_chip
  # Slices grow by doubling their shortest side (v4: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...).
  torus = [2, 2, 1] if generation.torus_dims == 3 else [1, 1]
  while math.prod(torus) < chips:
    shortest = min(torus)
    torus[max(i for i, side in enumerate(torus) if side == shortest)] *= 2
  if math.prod(torus) != chips or num_slices < 1:
    raise UserError(f"unsupported TPU topology {name!r} with {num_slices} slice(s): compile knows slices of a "
                    "power-of-two number of chips (v4/v5p: at least 4), and at least one slice")
  return Topology(name, generation, tuple(torus), num_slices)


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the topology (they carry slice_index when there are several slices)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling for a described topology touches no chip: skip the lock that gives one process the local chips
  # (so compiles run beside each other and beside training), and the TPU VM metadata that libtpu otherwise
  # looks for and warns about on stderr.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  megacore = topology.generation.devices_per_chip == 1 and topology.generation.name_units_per_chip == 2
  return topologies.get_topology_desc(topology.libtpu_name, "tpu", num_slices=topology.num_slices,
                                      chip_config_name="megacore" if megacore else "default").devices


def _one_line(error: Exception) -> str:
  """The compiler's reason, e.g. 'RESOURCE_EXHAUSTED: ... Used 20.1G of 15.5G hbm ...', on one line."""
  return " ".join(str(error).split())[:1000]


@dataclasses.dataclass
class Compiled:
  """The trainer's train step compiled for a topology: the program (None when it does not fit), and what it ran
  over."""
  config: object
  topology: Topology
  devices: list
  mesh: object
  setup: object
  executable: object  # jax.stages.Compiled, or None: the compiler's misfit reason is in `reason`
  reason: str | None
  compile_s: float

  def analysis(self) -> hlo.Analysis:
    """The program read back, with the FLOPs of its Pallas kernels (splash attention) added from their shapes."""
    analysis = hlo.analyse(self.executable.as_text(), len(self.devices))
    causal = self.setup.model.cfg.causal
    for k in analysis.kernels:
      # q: the kernel's first floating-point operand of [..., T, head_dim] (the mask tables before it are ints).
      floats = (hlo.dims(s) for s in k.operands if s.startswith(("bf16", "f16", "f32")))
      q = next((d for d in floats if len(d) >= 3), None)
      if q:
        analysis.flops += k.count * model_lib.splash_flops(k.name, tuple(q), causal)
    return analysis


def compile_for(config, topology: Topology) -> Compiled:
  """Lowers the trainer's jitted train step over abstract state and batch for the topology and compiles it."""
  config = config.copy_and_resolve_references()
  if config.mesh.dcn_data != topology.num_slices:
    raise UserError(f"config.mesh.dcn_data={config.mesh.dcn_data} but the topology has {topology.num_slices} "
                    "slice(s): data parallelism across slices needs one mesh row per slice")
  devices = topology_devices(topology)
  # 'auto' must resolve for the target (TPU of this generation), not for the CPU this compile runs on.
  config.model.attention = model_lib.resolve_attention(model_lib.ModelConfig.from_config(config), "tpu",
                                                       devices[0].device_kind)
  config_lib.validate(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  sharding_lib.check_batch(config.batch_size, mesh)
  setup = train_lib.setup(config, mesh)
  start = time.perf_counter()
  with sharding_lib.activate(mesh):
    try:
      lowered = setup.train_step.lower(setup.abstract_state, train_lib.abstract_batch(config, setup))
    except ValueError as e:
      if "evenly divide" not in str(e):  # jax's IndivisibleError: a mesh axis that does not split a weight
        raise
      raise UserError(f"config.mesh {dict(mesh.shape)} does not split the model: {_one_line(e)}") from None
    try:
      executable, reason = lowered.compile(), None
    except Exception as e:  # pylint: disable=broad-except  (Pallas raises its own MosaicError, no JaxRuntimeError)
      if "Mosaic failed to compile" in str(e):  # a Pallas kernel (splash) this generation cannot run
        raise UserError(f"config.model.attention={config.model.attention!r} does not compile for "
                        f"{devices[0].device_kind}: {_one_line(e)[:300]}") from None
      if not isinstance(e, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(e):
        raise
      executable, reason = None, _one_line(e)
  return Compiled(config, topology, devices, mesh, setup, executable, reason, time.perf_counter() - start)


def compile_train_step(config, topology: Topology, *, mfu: float = 0.5) -> dict:
  """The report of `pixelgpt compile`: memory and fit, the step-time estimate, and what each host decodes."""
  c = compile_for(config, topology)
  config, devices, mesh, compiled = c.config, c.devices, c.mesh, c.executable
  # What each host of the pod will decode per step: the rows its devices hold (a row held by devices of several
  # hosts is decoded by each of them).
  rows = [len(r) for r in sharding_lib.process_rows(sharding_lib.batch_sharding(mesh), config.batch_size).values()]
  model_cfg = c.setup.model.cfg
  tokens_per_step = config.batch_size * model_cfg.seq_len
  flops_per_step = metrics_lib.flops_per_token(model_cfg) * tokens_per_step
  peak = metrics_lib.peak_flops_per_device(devices[0])
  step_time_s = flops_per_step / (len(devices) * peak * mfu)
  hbm_bytes = topology.generation.hbm_gib * GIB
  report = {
      "topology": topology.name, "libtpu_topology": topology.libtpu_name, "num_slices": topology.num_slices,
      "devices": len(devices), "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      "batch_size": config.batch_size, "tokens_per_step": tokens_per_step,
      "params": model_lib.count_params(c.setup.abstract_state.params), "attention": config.model.attention,
      "remat": config.model.remat, "per_device_bytes": None, "hbm_bytes": hbm_bytes, "fits": False,
      "reason": c.reason, "flops_per_step": flops_per_step, "compiler_flops_per_device": None, "mfu": mfu,
      "step_time_s": step_time_s, "tokens_per_sec": tokens_per_step / step_time_s, "compile_s": c.compile_s,
      "processes": len(rows), "rows_per_process": {"min": min(rows), "max": max(rows)},
      "rows_decoded_per_step": sum(rows), "host_images_per_sec": max(rows) / step_time_s, "estimate": None,
  }
  if compiled is not None:
    m = compiled.memory_analysis()
    # The donated state's outputs reuse its argument buffers: count aliased bytes once.
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    report["per_device_bytes"] = {"arguments": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
                                  "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes, "total": total}
    report["fits"] = total <= hbm_bytes  # the TPU compiler refuses what it cannot place: a check of the table
    report["reason"] = None if report["fits"] else f"needs {total / GIB:.2f} GiB of {hbm_bytes / GIB:.0f} GiB HBM"
    # XLA counts a scanned loop's body once, so this undercounts the layers; kept as the compiler's own view.
    report["compiler_flops_per_device"] = (compiled.cost_analysis() or {}).get("flops")
    # The estimate reads the program as scheduled, loops counted (hlo.py); replica groups index the program's
    # device assignment, which is the mesh's devices in order.
    report["estimate"] = estimate_lib.estimate(
        c.analysis(), devices=list(mesh.devices.flat), torus=topology.torus, generation=topology.generation.name,
        devices_per_chip=topology.generation.devices_per_chip, model_flops_per_device=flops_per_step / len(devices),
        tokens_per_step=tokens_per_step)
    if report["estimate"]:
      report["host_images_per_sec"] = max(rows) / report["estimate"]["step_s"]
  return report


def format_report(r: dict, label: str) -> str:
  mesh = " ".join(f"{axis}={size}" for axis, size in r["mesh"].items())
  lines = [f"{label} on {r['topology']}" + (f" × {r['num_slices']} slices" if r["num_slices"] > 1 else "")
           + f" ({r['libtpu_topology']}): {r['devices']} devices ({r['device_kind']}), mesh {mesh}, "
           f"batch {r['batch_size']}, {r['params'] / 1e6:,.0f}M parameters, attention {r['attention']}, "
           f"remat {r['remat']}"]
  if r["per_device_bytes"]:
    b = {k: v / GIB for k, v in r["per_device_bytes"].items()}
    lines.append(f"  per device: arguments {b['arguments']:.2f} GiB + temporaries {b['temp']:.2f} GiB + outputs "
                 f"{b['output']:.2f} GiB - donated {b['alias']:.2f} GiB = {b['total']:.2f} GiB of "
                 f"{r['hbm_bytes'] / GIB:.0f} GiB HBM")
  lines.append(f"  FLOPs per step {r['flops_per_step']:.3g} (model); at an assumed {r['mfu']:.0%} MFU: "
               f"{r['step_time_s']:.3g} s/step, {r['tokens_per_sec']:,.0f} tokens/s")
  e = r["estimate"]
  if e:
    ms = lambda s: f"{1e3 * s:,.1f}"
    lines.append(f"  estimate (from the compiled program, not a measurement): {ms(e['step_s'])} ms/step = max(compute "
                 f"{ms(e['compute_s'])}, HBM {ms(e['hbm_s'])}, ICI {ms(e['ici_s'])} + DCN {ms(e['dcn_s'])}) -> "
                 f"MFU {e['mfu']:.0%}, {e['tokens_per_sec']:,.0f} tokens/s; bottleneck "
                 f"{e['bottleneck']}; {ms(e['serial_s'])} ms with nothing overlapped")
    moved = ", ".join(f"{kind} {b / GIB:.2f} GiB" for kind, b in e["collective_bytes"].items() if b)
    lines.append(f"  collectives per device per step: {moved or 'none'}")
  per_host = r["rows_per_process"]
  spread = f"{per_host['min']}" if per_host["min"] == per_host["max"] else f"{per_host['min']}-{per_host['max']}"
  pace = "at the estimated step time" if e else f"at {r['mfu']:.0%} MFU"
  lines.append(f"  feeding: each of {r['processes']} hosts decodes {spread} of the batch's {r['batch_size']} rows per "
               f"step ({r['rows_decoded_per_step'] / r['batch_size']:.3g}× the batch in all), "
               f"{r['host_images_per_sec']:,.0f} images/s per host {pace}")
  lines.append(f"  compiled in {r['compile_s']:.1f} s: " + ("fits" if r["fits"] else f"does not fit: {r['reason']}"))
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt compile`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_config_flag(fv)
  flags.DEFINE_string("topology", None, "Cloud TPU accelerator type of one slice: v3-8, v3-2048, v4-2048, "
                      "v5p-2048, v5e-256, ...", flag_values=fv)
  flags.DEFINE_integer("num_slices", None, "Slices joined over DCN (default: config.mesh.dcn_data).", flag_values=fv)
  flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation at which to project step time and tokens/s.",
                     flag_values=fv)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the text report.", flag_values=fv)


def main(fv):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if not 0 < fv.mfu <= 1:
    raise UserError(f"--mfu must be in (0, 1], got {fv.mfu}")
  num_slices = fv.config.mesh.dcn_data if fv.num_slices is None else fv.num_slices
  report = compile_train_step(fv.config, parse_topology(fv.topology, num_slices), mfu=fv.mfu)
  print(json.dumps(report) if fv.json else format_report(report, config_flags.get_config_filename(fv["config"])))
  if not report["fits"]:
    sys.exit(1)
