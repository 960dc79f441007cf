"""Compiles every combination of configs/pod.py (model × topology) for its TPU topology on this machine (libtpu,
no TPU needed) and writes the pod table: benchmarks/results/pod_table.json and pod_table.md.

  JAX_PLATFORMS=cpu python benchmarks/pod_table.py    # about 15 minutes on a 2-core CPU

Each row is `pixelgpt compile --config configs/pod.py:MODEL,TOPOLOGY --topology T --num_slices N --json`, run in
this process one after another, so that compile times are comparable.
"""

import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform

import jax

from pixelgpt import compile as compile_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MFU = 0.5


def pod_configs():
  """configs/pod.py as a module: its COMBINATIONS, get_config(arg) and parse(arg)."""
  spec = importlib.util.spec_from_file_location("pod", os.path.join(REPO, "configs", "pod.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def compile_all() -> list[dict]:
  rows, pod = [], pod_configs()
  for arg in pod.COMBINATIONS:
    report = compile_lib.compile_train_step(pod.get_config(arg), pod.parse(arg)[1], mfu=MFU)
    rows.append({"config": f"configs/pod.py:{arg}", **report})
    print(compile_lib.format_report(report, rows[-1]["config"]), flush=True)
    jax.clear_caches()  # one compile's executables and traces are no use to the next
    gc.collect()
  return sorted(rows, key=lambda r: (r["topology"], r["num_slices"], r["tokens_per_step"] // r["batch_size"],
                                     r["params"]))


def markdown(rows: list[dict], machine: str) -> str:
  gib = lambda b: f"{b / compile_lib.GIB:.2f}"
  lines = [
      "# Pod table: every combination of configs/pod.py, compiled ahead of time for its TPU topology",
      "",
      f"Produced by `python benchmarks/pod_table.py` ({machine}). Memory is the compiler's per-device buffer "
      "assignment: arguments + temporaries + outputs, counting the donated train state once. Step time and "
      f"tokens/s are projections at {MFU:.0%} MFU from model FLOPs (metrics.flops_per_token) and the bf16 peak "
      "of the device kind (metrics.PEAK_FLOPS_PER_DEVICE), not measurements. Rows/host is what each host decodes "
      "per step (sharding.process_rows: the rows its devices hold; a row whose tensor-parallel group spans hosts "
      f"is decoded by each), and images/s/host what that means at {MFU:.0%} MFU.",
      "",
      "| config | topology | devices | mesh data×fsdp×tensor | batch | remat | memory/device (GiB) | HBM (GiB) "
      f"| fits | FLOPs/step | step at {MFU:.0%} MFU (s) | tokens/s | hosts | rows/host | images/s/host | "
      "compile (s) |",
      "|" + "---|" * 16,
  ]
  for r in rows:
    topology = r["topology"] + (f" × {r['num_slices']}" if r["num_slices"] > 1 else "")
    memory = gib(r["per_device_bytes"]["total"]) if r["per_device_bytes"] else "—"
    per_host = r["rows_per_process"]
    rows_per_host = per_host["min"] if per_host["min"] == per_host["max"] else f"{per_host['min']}-{per_host['max']}"
    lines.append(
        f"| {r['config']} | {topology} | {r['devices']} | {'×'.join(map(str, r['mesh'].values()))} | "
        f"{r['batch_size']} | {r['remat']} | {memory} | {r['hbm_bytes'] / compile_lib.GIB:.0f} | "
        f"{'yes' if r['fits'] else 'no: ' + r['reason']} | {r['flops_per_step']:.3g} | {r['step_time_s']:.3g} | "
        f"{r['tokens_per_sec']:,.0f} | {r['processes']} | {rows_per_host} | {r['host_images_per_sec']:,.0f} | "
        f"{r['compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main():
  machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}, "
             f"libtpu {importlib.metadata.version('libtpu')}, {datetime.date.today().isoformat()}")
  rows = compile_all()
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "pod_table.json"), "w") as f:
    json.dump({"machine": machine, "mfu": MFU, "rows": rows}, f, indent=1)
  with open(os.path.join(RESULTS, "pod_table.md"), "w") as f:
    f.write(markdown(rows, machine))
  print(f"pod_table: {len(rows)} configs, {sum(r['fits'] for r in rows)} fit -> {RESULTS}/pod_table.md")


if __name__ == "__main__":
  main()
