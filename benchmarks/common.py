"""Shared pieces of the benchmarks: the benchmark shapes as pixelgpt configs, the same model in transformers,
interleaved timing, the machine's matmul peak and load, and the results writer.

Run the benchmarks from the repository root (`python benchmarks/X.py`); each writes benchmarks/results/X.{json,md}.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from pixelgpt import config as config_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import train
from pixelgpt.data import pipeline
from pixelgpt.interop import hf as hf_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")

# Model shapes by name: layers, width, heads, image side; batch is the global batch of one train step.
# 'small' is the side-by-side shape; the igpt_* shapes are the paper's (config.IGPT_FAMILY).
SHAPES = {
    "small": dict(n_layer=4, d_model=256, n_head=8, resolution=32, batch_size=8),
    **{f"igpt_{size}": {key: f[key] for key in ("n_layer", "d_model", "n_head", "resolution", "batch_size")}
       for size, f in config_lib.IGPT_FAMILY.items()},
}
PALETTE_SIZE = 512  # the paper's 9-bit palette


def shape_config(shape: str, *, dtype: str = "float32", batch_size: int | None = None, n_layer: int | None = None,
                 attention: str = "auto", remat: str = "none", use_bias: bool = False, scan_layers: bool = True,
                 total_steps: int = 1000):
  """A pixelgpt config of a named shape: RGB images, K=512, the paper's Adam(0.9, 0.95) and the trainer defaults."""
  s = SHAPES[shape]
  overrides = {
      "batch_size": batch_size or s["batch_size"], "total_steps": total_steps,
      "dataset.resolution": s["resolution"], "dataset.channels": 3, "palette.size": PALETTE_SIZE,
      "model.n_layer": n_layer or s["n_layer"], "model.d_model": s["d_model"], "model.n_head": s["n_head"],
      "model.dtype": dtype, "model.attention": attention, "model.remat": remat, "model.use_bias": use_bias,
      "model.scan_layers": scan_layers,
      "mesh.fsdp": 1,
  }
  config = config_lib.override(config_lib.base(), overrides)
  config_lib.validate(config)
  return config


def pixelgpt_setup(config):
  """train.setup on one CPU device (the real jitted train step) and its initial state."""
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  s = train.setup(config, mesh)
  return s, s.init(jax.random.key(config.seed)), mesh


def pixelgpt_trainer(config, batches):
  """(step fn, last-loss fn, initial params) for the real jitted, state-donating train step, compiled ahead under
  the mesh and logical rules as train.run does; each call trains one step on the next of `batches`."""
  s, state, mesh = pixelgpt_setup(config)
  with sharding_lib.activate(mesh):
    compiled = s.train_step.lower(state, train.abstract_batch(config, s)).compile()
  params = jax.tree.map(np.asarray, state.params)  # a host copy: the state is donated to the first step
  holder = {"state": state, "step": 0, "loss": None}

  def step():
    batch = {"tokens": batches[holder["step"] % len(batches)], "label": np.zeros((config.batch_size,), np.int32)}
    holder["state"], metrics = compiled(holder["state"], pipeline.to_global(batch, s.batch_sharding, config.batch_size))
    holder["loss"] = metrics["train/loss"]
    jax.block_until_ready((holder["state"], holder["loss"]))
    holder["step"] += 1

  return step, lambda: float(holder["loss"]), params


def hf_model(config, params):
  """transformers' ImageGPTForCausalImageModeling holding exactly `params` (converted by interop/hf.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config, state = hf_lib.hf_state(config, params)
  model = transformers.ImageGPTForCausalImageModeling(hf_config)
  model.load_state_dict({name: torch.from_numpy(value.copy()) for name, value in state.items()}, strict=True)
  return model


def perturbed(params, seed: int = 0, scale: float = 0.05):
  """params + scale·N(0, 1) on every tensor: the zero-initialised head then gives non-trivial logits."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def random_tokens(config, n_batches: int, seed: int = 0) -> list[np.ndarray]:
  """Token batches [B, T] int32 (throughput does not depend on their values; both sides get the same ones)."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, config_lib.seq_len(config))
  return [rng.integers(0, config.palette.size, shape, dtype=np.int32) for _ in range(n_batches)]


def timed(fn) -> float:
  """Seconds `fn()` takes; fn must block until its work is done."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved(fns: dict, rounds: int, warmup: int, settle_s: float = 0.5,
                repeats: int = 1) -> dict[str, list[float]]:
  """Times each fn once per round (the best of `repeats` calls), in turn, so that every side sees the same
  background load; drops warm-up rounds.

  Sleeps settle_s before each side: PyTorch's OpenMP workers and XLA's thread pool spin for a while after their work
  ends, and would otherwise take cores from the side timed next.
  """
  times = {name: [] for name in fns}
  for i in range(warmup + rounds):
    for name, fn in fns.items():
      time.sleep(settle_s)
      seconds = min(timed(fn) for _ in range(repeats))
      if i >= warmup:
        times[name].append(seconds)
  return times


def median(values) -> float:
  return float(statistics.median(values))


def load_average() -> float:
  return os.getloadavg()[0]


# The instruction sets that decide CPU matmul speed: AVX-512 (and its bf16 dot products), Intel's AMX tiles.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo(field: str) -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith(field))
  except (OSError, StopIteration):
    return ""


def machine_kind(cpu: str, flags: list[str]) -> str:
  """A short name for the CPU kind, which results files carry: 'amd_epyc', 'intel_xeon_amx', ..."""
  words = [w for w in "".join(c if c.isalnum() else " " for c in cpu.replace("(R)", "")).lower().split()
           if w in ("amd", "epyc", "intel", "xeon", "ryzen", "core", "arm", "neoverse")]
  return "_".join(words[:2] or ["cpu"]) + ("_amx" if "amx_bf16" in flags else "")


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict:
  """Best rates (GB/s) over arrays far larger than any cache: XLA reading (a sum: what a memory-bound decode
  does), PyTorch's multi-threaded STREAM copy and triad (a = b + 3·c). XLA's own elementwise kernels reach a
  fraction of these here, so they are not the machine's bandwidth."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = megabytes * 2 ** 20 // 4
  x = jnp.ones(n, jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  rates = {"xla_read_gb_per_s": n * 4 / min(timed(lambda: total(x).block_until_ready()) for _ in range(repeats))}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {k: round(v / 1e9, 1) for k, v in rates.items()}
  a, b, c = torch.ones(n), torch.ones(n), torch.full((n,), 2.0)
  rates["torch_copy_gb_per_s"] = 2 * n * 4 / min(timed(lambda: a.copy_(b)) for _ in range(repeats))
  rates["torch_triad_gb_per_s"] = 3 * n * 4 / min(timed(lambda: torch.add(b, c, alpha=3.0, out=a))
                                                  for _ in range(repeats))
  return {k: round(v / 1e9, 1) for k, v in rates.items()}


def matmul_peaks(size: int = 2048, repeats: int = 5) -> dict:
  """Best GFLOP/s of one size³ matmul: XLA f32 and bf16 (f32 accumulation), PyTorch f32 and bf16 (where oneDNN
  uses AMX on CPUs that have it)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  flops = 2 * size ** 3
  peaks = {}
  for dtype in ("float32", "bfloat16"):
    a = jnp.ones((size, size), dtype)
    fn = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    fn(a).block_until_ready()
    peaks[f"xla_{dtype}_gflops"] = round(flops / min(timed(lambda: fn(a).block_until_ready())
                                                     for _ in range(repeats)) / 1e9, 1)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return peaks
  for dtype in ("float32", "bfloat16"):
    a = torch.ones((size, size), dtype=getattr(torch, dtype))
    torch.matmul(a, a)
    peaks[f"torch_{dtype}_gflops"] = round(flops / min(timed(lambda: torch.matmul(a, a)) for _ in range(repeats))
                                           / 1e9, 1)
  return peaks


def machine(measure: bool = False) -> dict:
  """What the numbers were measured on: CPU, its kind, cores, ISA flags, library versions, date, the 1-minute load
  average; with `measure`, also its memory bandwidth and matmul peaks (about 20 s)."""
  cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
  flags = [f for f in ISA_FLAGS if f in _cpuinfo("flags").split()]
  versions = {name: importlib.metadata.version(name) for name in ("jax", "flax", "torch", "transformers", "grain")}
  m = {"cpu": cpu, "kind": machine_kind(cpu, flags), "cores": os.cpu_count(), "isa": flags,
       "backend": jax.default_backend(), "versions": versions,
       "date": datetime.datetime.now().isoformat(timespec="minutes"), "load_average_1m": round(load_average(), 2)}
  if measure:
    m["memory"] = memory_bandwidth()
    m["matmul"] = matmul_peaks()
  return m


def describe(m: dict) -> str:
  load = f"{m['load_average_1m']}"
  if "load_average_1m_after" in m:
    load += f" before, {m['load_average_1m_after']} after"
  text = (f"{m['cores']}-core {m['cpu']} ({m['backend']}; {' '.join(m.get('isa', [])) or 'ISA flags not recorded'})"
          f", jax {m['versions']['jax']}, torch {m['versions']['torch']}, transformers "
          f"{m['versions']['transformers']}, {m['date']}, 1-minute load average {load}")
  if "memory" in m:
    text += ("; memory GB/s: " + ", ".join(f"{k.removesuffix('_gb_per_s').replace('_', ' ')} {v}"
                                          for k, v in m["memory"].items()) + "; 2048³ matmul GFLOP/s: " + ", ".join(
                 f"{k.rsplit('_', 1)[0].replace('_', ' ')} {v}" for k, v in m["matmul"].items()))
  return text


def write(name: str, payload: dict, markdown: str) -> str:
  """benchmarks/results/<name>.json and .md; returns the markdown path."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=1)
  path = os.path.join(RESULTS, f"{name}.md")
  with open(path, "w") as f:
    f.write(markdown)
  return path
