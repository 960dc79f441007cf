"""The step-time estimator (pixelgpt/estimate.py) beside MaxText's published measured MFU.

For each anchor, a pixelgpt decoder of the same width, depth, sequence length, global batch, mesh and remat is
compiled for the same TPU topology through libtpu, and its estimated MFU is put beside the measured one.

  python benchmarks/estimator_calibration.py          # libtpu (pip install -e ".[tpu]"); ~10 minutes on 2 cores

What cannot match exactly, per anchor, is in its `differs` note: pixelgpt's blocks are GPT-2's (GELU MLP of
mlp_ratio × d, heads of d / n_head), MaxText's are Llama-2's (SwiGLU of 3 matrices, heads × 128 that may exceed the
width); the sequence is a square image (45² = 2025 tokens for 2048); the vocabulary is the palette (32,000 here,
as MaxText's).
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiles for TPU topologies run on the CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import compile as compile_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import estimate as estimate_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

def _source(generation: str, run: str) -> str:
  return f"AI-Hypercomputer/maxtext MaxText/configs/{generation}/README.md @0ed7bd5; run: configs/{generation}/{run}"


# pixelgpt's nearest models to MaxText's (global_parameter_scale 16, 32, 64): width, depth, heads, MLP.
MODEL_16B = {"model.d_model": 4096, "model.n_layer": 32, "model.n_head": 32, "model.mlp_ratio": 10}
MODEL_32B = {"model.d_model": 8192, "model.n_layer": 32, "model.n_head": 64, "model.mlp_ratio": 5}
MODEL_64B = {**MODEL_32B, "model.n_layer": 64}
V5P_MESH = {"mesh.fsdp": 16, "mesh.tensor": 4}
V5E_MESH = {"mesh.fsdp": 256, "mesh.tensor": 1}
DIFFERS_16B = "attention 4·d² = 67M vs 4·d·8192 = 134M weights per layer (64 heads of 128 on d=4096); MLP 336M vs 352M"
# name, topology, slices, published MFU, source, pixelgpt overrides, what differs from MaxText's model.
ANCHORS = [
    ("32B", "v5p-128", 1, 0.7147, _source("v5p", "32b.sh (per_device_batch 6, ici_tensor 4, remat minimal)"),
     {**MODEL_32B, **V5P_MESH, "batch_size": 384},
     "MLP 2·5·d² = 671M vs SwiGLU 3·d·28672 = 705M weights per layer; remat full, where MaxText keeps the "
     "matmul outputs ('minimal'): kept so (dots_no_batch) they need 123 GiB of the 96 here, so the forward pass "
     "runs twice and the estimate pays ~1/3 more FLOPs than MaxText did"),
    ("64B", "v5p-128", 1, 0.7031, _source("v5p", "64b.sh (per_device_batch 3, ici_tensor 4, remat minimal)"),
     {**MODEL_64B, **V5P_MESH, "batch_size": 192},
     "MLP 671M vs 705M weights per layer; remat full for minimal (as above: 127 GiB otherwise)"),
    ("32B", "v5e-256", 1, 0.6686, _source("v5e", "32b.sh (per_device_batch 4, fsdp 256, remat full)"),
     {**MODEL_32B, **V5E_MESH, "batch_size": 1024}, "MLP 671M vs 705M weights per layer"),
    ("16B", "v5e-256", 1, 0.6110, _source("v5e", "16b.sh (per_device_batch 6, fsdp 256, remat full)"),
     {**MODEL_16B, **V5E_MESH, "batch_size": 1536}, DIFFERS_16B),
    ("16B", "v5e-256", 2, 0.5937,
     "AI-Hypercomputer/maxtext MaxText/configs/v5e/README.md @0ed7bd5 (2 × v5e-256); run: configs/v5e/16b.sh",
     {**MODEL_16B, **V5E_MESH, "batch_size": 3072, "mesh.dcn_data": 2}, "as above; data parallel over 2 slices"),
]
# 48² = 2304 tokens: the square nearest 2048 in whole 128-token blocks, so that splash attention runs as MaxText's
# flash attention does (no T×T scores in HBM).
# Remat full everywhere: MaxText's v5e runs use it, and its v5p 'minimal' does not fit here (see those rows).
COMMON = {"dataset.resolution": 48, "dataset.channels": 3, "palette.size": 32000, "model.dtype": "bfloat16",
          "model.attention": "splash", "mesh.data": 1, "model.remat": "full"}


def main():
  rows = []
  for name, topology, slices, published, source, overrides, differs in ANCHORS:
    config = config_lib.override(config_lib.base(), {**COMMON, **overrides})
    start = time.perf_counter()
    report = compile_lib.compile_train_step(config, compile_lib.parse_topology(topology, slices))
    e = report["estimate"]
    where = topology + (f" × {slices}" if slices > 1 else "")
    print(f"{name} on {where}: " + (f"estimated MFU {e['mfu']:.1%} (published {published:.1%}), bottleneck "
                                    f"{e['bottleneck']}" if e else f"does not fit: {report['reason']}")
          + f", {time.perf_counter() - start:.0f} s", flush=True)
    rows.append({"model": name, "topology": topology, "slices": slices, "published_mfu": published,
                 "source": source, "differs": differs, "overrides": overrides, "params": report["params"],
                 "fits": report["fits"], "reason": report["reason"],
                 "estimate": {k: v for k, v in e.items() if k != "chip"} if e else None,
                 "error_points": 100 * (e["mfu"] - published) if e else None})
  m = common.machine()
  payload = {"machine": m, "compute_efficiency": estimate_lib.COMPUTE_EFFICIENCY, "common": COMMON, "rows": rows}
  lines = [
      "# Step-time estimator vs MaxText's published MFU",
      "",
      "`python benchmarks/estimator_calibration.py`: a pixelgpt decoder of each anchor's shape, batch, mesh and "
      "remat compiled through libtpu for the same topology; `pixelgpt compile`'s estimate (an **estimate** from the "
      "compiled program and published chip figures, pixelgpt/estimate.py) beside the MFU MaxText measured. "
      f"Compiled on: {common.describe(m)}. Compute efficiency (the matrix units' share of peak on real kernels, "
      f"the estimator's one fitted constant): {estimate_lib.COMPUTE_EFFICIENCY:.2f}.",
      "",
      "| anchor | pixelgpt params | estimated step (ms) | compute / HBM / ICI / DCN (ms) | bottleneck | "
      "estimated MFU | published MFU | estimate − published |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    e = r["estimate"]
    where = r["topology"] + (f" × {r['slices']}" if r["slices"] > 1 else "")
    if e is None:  # the compiler refused it: no program to estimate
      lines.append(f"| {r['model']} on {where} | {r['params'] / 1e9:.1f}B | does not fit: {r['reason'][:120]} | | | | "
                   f"{r['published_mfu']:.1%} | |")
      continue
    terms = " / ".join(f"{1e3 * e[k]:,.0f}" for k in ("compute_s", "hbm_s", "ici_s", "dcn_s"))
    lines.append(f"| {r['model']} on {where} | {r['params'] / 1e9:.1f}B | {1e3 * e['step_s']:,.0f} | {terms} | "
                 f"{e['bottleneck']} | {e['mfu']:.1%} | {r['published_mfu']:.1%} | {r['error_points']:+.1f} points |")
  errors = [abs(r["error_points"]) for r in rows if r["error_points"] is not None]
  lines += ["", f"Mean absolute difference: {sum(errors) / max(len(errors), 1):.1f} MFU points over {len(errors)} "
            "anchors. Reading it:",
            "- Every anchor is compute-bound in the estimate; the compute term is the program's FLOPs (remat "
            "recomputation included) at the peak times the one fitted constant, so the MFU it gives is "
            "efficiency × model FLOPs / program FLOPs. The like-for-like anchor (32B on v5e-256: same width, heads, "
            "mesh, remat full) lands within 2 points; the v5p anchors are low because pixelgpt must recompute the "
            "forward pass (remat full) where MaxText keeps the matmul outputs; the 16B anchors are high because "
            "pixelgpt's 16B has half MaxText's attention width (heads of d / n_head), so less of its work is "
            "attention.",
            "- Two slices: the estimate prices the inter-slice gradient all-reduce at 34 ms of an 8.5 s step "
            "(0.4%, DCN bandwidth 3.1 GB/s per chip) and hides it behind compute; MaxText measured a 1.7-point drop "
            "(2.8%). Bandwidth cannot explain that drop (it would take 8× the bytes), so the overlap model stays: "
            "the loss is synchronisation across slices, which the estimator does not model — an estimate for many "
            "slices is optimistic by about that much.",
            "", "Sources and shape differences:", ""]
  lines += [f"- {r['model']} on {r['topology']}{' × ' + str(r['slices']) if r['slices'] > 1 else ''}: "
            f"{r['source']}. Differs: {r['differs']}." for r in rows]
  print(f"-> {common.write('estimator_calibration', payload, chr(10).join(lines) + chr(10))}")


if __name__ == "__main__":
  main()
