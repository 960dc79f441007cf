"""Compiles every combination of configs/pod.py (model × topology) for its TPU topology on this machine (libtpu,
no TPU needed) and writes the pod table: benchmarks/results/pod_table.json and pod_table.md.

  JAX_PLATFORMS=cpu python benchmarks/pod_table.py    # about 40 minutes on a 2-core CPU (compiles, then plans)

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
PLAN_MODEL = "l"  # the planner runs on iGPT-L for every topology of the table
PLAN_REMATS = ("none", "full")


def pod_configs():
  """configs/pod.py as a module: its COMBINATIONS, get_config(arg) and parse(arg)."""
  spec = importlib.util.spec_from_file_location("pod", os.path.join(REPO, "configs", "pod.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def compile_all() -> list[dict]:
  rows, pod = [], pod_configs()
  for arg in pod.COMBINATIONS:
    report = compile_lib.compile_train_step(pod.get_config(arg), pod.parse(arg)[1])
    rows.append({"config": f"configs/pod.py:{arg}", **report})
    print(compile_lib.format_report(report, rows[-1]["config"]), flush=True)
    jax.clear_caches()  # one compile's executables and traces are no use to the next
    gc.collect()
  return sorted(rows, key=lambda r: (r["topology"], r["num_slices"], r["tokens_per_step"] // r["batch_size"],
                                     r["params"]))


def markdown(rows: list[dict], plans: list[dict], machine: str) -> str:
  gib = lambda b: f"{b / compile_lib.GIB:.2f}"
  lines = [
      "# Pod table: every combination of configs/pod.py, compiled ahead of time for its TPU topology",
      "",
      f"Produced by `python benchmarks/pod_table.py` ({machine}). Memory is the compiler's per-device buffer "
      "assignment: arguments + temporaries + outputs, counting the donated train state once. Step time, MFU, "
      "tokens/s and the bottleneck are **estimates** from each compiled program (pixelgpt/hlo.py reads its FLOPs, "
      "HBM bytes and collectives; pixelgpt/estimate.py prices them with published chip figures, collectives "
      "overlapping compute), not measurements; [estimator_calibration.md](estimator_calibration.md) puts the "
      "estimator beside MaxText's measured MFU. Rows/host is what each host decodes per step "
      "(sharding.process_rows: the rows its devices hold; a row whose tensor-parallel group spans hosts is decoded "
      "by each), and images/s/host what that means at the estimated step time.",
      "",
      "| config | topology | devices | mesh data×fsdp×tensor | batch | remat | memory/device (GiB) | HBM (GiB) "
      "| fits | estimated step (ms): compute / HBM / ICI / DCN | estimated MFU | bottleneck | estimated tokens/s | "
      "hosts | rows/host | images/s/host | compile (s) |",
      "|" + "---|" * 17,
  ]
  for r in rows:
    topology = r["topology"] + (f" × {r['num_slices']}" if r["num_slices"] > 1 else "")
    memory = gib(r["per_device_bytes"]["total"]) if r["per_device_bytes"] else "—"
    per_host = r["rows_per_process"]
    rows_per_host = per_host["min"] if per_host["min"] == per_host["max"] else f"{per_host['min']}-{per_host['max']}"
    e = r["estimate"]
    terms = " / ".join(f"{1e3 * e[k]:,.1f}" for k in ("compute_s", "hbm_s", "ici_s", "dcn_s")) if e else "—"
    lines.append(
        f"| {r['config']} | {topology} | {r['devices']} | {'×'.join(map(str, r['mesh'].values()))} | "
        f"{r['batch_size']} | {r['remat']} | {memory} | {r['hbm_bytes'] / compile_lib.GIB:.0f} | "
        f"{'yes' if r['fits'] else 'no: ' + r['reason']} | "
        + (f"**{1e3 * e['step_s']:,.1f}**: {terms} | {e['mfu']:.0%} | {e['bottleneck']} | "
           f"{e['tokens_per_sec']:,.0f} | " if e else "— | — | — | — | ")
        + f"{r['processes']} | {rows_per_host} | {r['host_images_per_sec']:,.0f} | {r['compile_s']:.0f} |")
  if plans:
    lines += ["", "## The planner's best layout per topology", "",
              "`pixelgpt plan --config configs/pod.py:MODEL,TOPOLOGY --topology T [--num_slices N] "
              f"--remat {','.join(PLAN_REMATS)}` (estimates; candidates compiled, skipped on a bound, or refused "
              "without compiling; wall time on this machine, compiles cached afterwards):", "",
              "| config | shipped layout: estimated tokens/s | planner's best (estimated tokens/s, MFU, bottleneck) | "
              "× shipped | candidates: compiled / skipped / refused | plan wall (s) |", "|---|---|---|---|---|---|"]
    for p in plans:
      b = p["best"]["estimate"]
      lines.append(f"| {p['config']} | {p['shipped_tokens_per_sec']:,.0f} | `{p['best']['flags']}` "
                   f"({b['tokens_per_sec']:,.0f}, {b['mfu']:.0%}, {b['bottleneck']}) | "
                   f"{b['tokens_per_sec'] / p['shipped_tokens_per_sec']:.2f} | "
                   f"{p['compiled']} / {p['skipped']} / {p['refused']} | {p['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def plan_all(rows: list[dict]) -> list[dict]:
  """The planner on iGPT-L for every topology of the table, beside the shipped layout's estimate."""
  import time  # pylint: disable=g-import-not-at-top
  from pixelgpt import plan as plan_lib  # pylint: disable=g-import-not-at-top
  out, pod = [], pod_configs()
  for arg in (a for a in pod.COMBINATIONS if a.startswith(f"{PLAN_MODEL},")):
    config, topology = pod.get_config(arg), pod.parse(arg)[1]
    start = time.perf_counter()
    ranked = plan_lib.plan(config, topology, batch_sizes=[config.batch_size], remats=list(PLAN_REMATS))
    shipped = next(r for r in rows if r["config"] == f"configs/pod.py:{arg}")
    statuses = [c.status.split(":")[0] for c in ranked]
    out.append({"config": f"configs/pod.py:{arg}", "best": plan_lib.candidate_row(ranked[0]),
                "shipped_tokens_per_sec": shipped["estimate"]["tokens_per_sec"],
                "compiled": sum(s in ("compiled", "cached", "does not fit") for s in statuses),
                "skipped": statuses.count("skipped"), "refused": statuses.count("refused"),
                "wall_s": time.perf_counter() - start})
    print(f"plan {arg}: best {ranked[0].flags()} ({ranked[0].tokens_per_sec:,.0f} tokens/s estimated)", flush=True)
  return out


def main():
  machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}, "
             f"libtpu {importlib.metadata.version('libtpu')}, {datetime.date.today().isoformat()}")
  rows = compile_all()
  plans = plan_all(rows)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "pod_table.json"), "w") as f:
    json.dump({"machine": machine, "rows": rows, "plans": plans}, f, indent=1)
  with open(os.path.join(RESULTS, "pod_table.md"), "w") as f:
    f.write(markdown(rows, plans, machine))
  print(f"pod_table: {len(rows)} configs, {sum(r['fits'] for r in rows)} fit -> {RESULTS}/pod_table.md")


if __name__ == "__main__":
  main()
