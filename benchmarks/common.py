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


def interleaved(fns: dict, rounds: int, warmup: int, settle_s: float = 0.5) -> dict[str, list[float]]:
  """Times each fn once per round, in turn, so that every side sees the same background load; drops warm-up.

  Sleeps settle_s before each call: PyTorch's OpenMP workers and XLA's thread pool spin for a while after their work
  ends, and would otherwise take cores from the side timed next.
  """
  times = {name: [] for name in fns}
  for i in range(warmup + rounds):
    for name, fn in fns.items():
      time.sleep(settle_s)
      seconds = timed(fn)
      if i >= warmup:
        times[name].append(seconds)
  return times


def median(values) -> float:
  return float(statistics.median(values))


def load_average() -> float:
  return os.getloadavg()[0]


def machine() -> dict:
  """What the numbers were measured on: CPU, cores, library versions, date, and the 1-minute load average."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = {name: importlib.metadata.version(name) for name in ("jax", "flax", "torch", "transformers", "grain")}
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(), "versions": versions,
          "date": datetime.datetime.now().isoformat(timespec="minutes"), "load_average_1m": round(load_average(), 2)}


def describe(m: dict) -> str:
  load = f"{m['load_average_1m']}"
  if "load_average_1m_after" in m:
    load += f" before, {m['load_average_1m_after']} after"
  return (f"{m['cores']}-core {m['cpu']} ({m['backend']}), jax {m['versions']['jax']}, torch {m['versions']['torch']}, "
          f"transformers {m['versions']['transformers']}, {m['date']}, 1-minute load average {load}")


def write(name: str, payload: dict, markdown: str) -> str:
  """benchmarks/results/<name>.json and .md; returns the markdown path."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=1)
  path = os.path.join(RESULTS, f"{name}.md")
  with open(path, "w") as f:
    f.write(markdown)
  return path
