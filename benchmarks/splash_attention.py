"""Splash attention (Pallas TPU kernel) against XLA's attention in the pod configs, at T = 1024, 2304 and 4096:
memory per device and estimated step time of the train step compiled for v5p-2048 through libtpu.

  JAX_PLATFORMS=cpu python benchmarks/splash_attention.py     # ~6 minutes on a 2-core CPU

Step times are estimates (pixelgpt/estimate.py) from each compiled program, not measurements.
"""

import gc
import importlib.util
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import compile as compile_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

TOPOLOGY = "v5p-2048"
MODELS = ("l", "l48", "xl")  # T = 1024, 2304, 4096 (configs/pod.py)


def main():
  spec = importlib.util.spec_from_file_location("pod", os.path.join(common.REPO, "configs", "pod.py"))
  pod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pod)
  rows = []
  for model in MODELS:
    arg = f"{model},{TOPOLOGY}"
    for attention in ("xla", "splash"):
      config = config_lib.override(pod.get_config(arg), {"model.attention": attention})
      r = compile_lib.compile_train_step(config, pod.parse(arg)[1])
      e = r["estimate"] or {}
      rows.append({"config": f"configs/pod.py:{arg}", "tokens": config_lib.seq_len(config), "attention": attention,
                   "fits": r["fits"], "reason": r["reason"],
                   "per_device_gib": r["per_device_bytes"]["total"] / 2**30 if r["per_device_bytes"] else None,
                   "estimate": {k: v for k, v in e.items() if k != "chip"} or None})
      print(f"{arg} {attention}: fits {r['fits']}, "
            + (f"{rows[-1]['per_device_gib']:.2f} GiB, est. step {1e3 * e['step_s']:.1f} ms ({e['bottleneck']})"
               if e else str(r["reason"])), flush=True)
      jax.clear_caches()
      gc.collect()
  m = common.machine()
  lines = ["# Splash attention vs XLA attention on v5p-2048 (compiled; step times are estimates)", "",
           f"`python benchmarks/splash_attention.py`: configs/pod.py's models with `model.attention` xla and splash, "
           f"compiled for {TOPOLOGY} through libtpu. Compiled on: {common.describe(m)}.", "",
           "| config | tokens | attention | memory/device (GiB) | estimated step (ms) | compute / HBM / ICI (ms) | "
           "estimated MFU | bottleneck |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    e = r["estimate"]
    if not e:
      lines.append(f"| {r['config']} | {r['tokens']} | {r['attention']} | does not fit: {r['reason']} | | | | |")
      continue
    terms = " / ".join(f"{1e3 * e[k]:,.1f}" for k in ("compute_s", "hbm_s", "ici_s"))
    lines.append(f"| {r['config']} | {r['tokens']} | {r['attention']} | {r['per_device_gib']:.2f} | "
                 f"{1e3 * e['step_s']:,.1f} | {terms} | {e['mfu']:.0%} | {e['bottleneck']} |")
  print(f"-> {common.write('splash_attention', {'machine': m, 'rows': rows}, chr(10).join(lines) + chr(10))}")


if __name__ == "__main__":
  main()
