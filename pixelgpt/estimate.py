"""An estimate of a TPU train step's time from its compiled program, before anyone rents the pod.

From the optimised HLO (hlo.py: FLOPs, HBM bytes and every collective, loops counted) and a per-generation table
of published chip figures, four times per step:
- compute_s: the program's FLOPs at the chip's peak bf16 rate, over COMPUTE_EFFICIENCY (what the matrix units
  reach on real kernels; calibrated on MaxText's published runs, benchmarks/results/estimator_calibration.md);
- hbm_s: the HBM bytes of every scheduled kernel at the chip's HBM bandwidth;
- ici_s: every collective inside a slice: a ring over each torus axis its group spans, both directions of a link
  where that axis wraps around (a full axis: 16 on v5e/v6e, a multiple of 4 on v4/v5p), one otherwise;
  all-gather and reduce-scatter move (g-1)/g of the full buffer, all-reduce twice that, all-to-all (g-1)/g,
  a collective-permute the buffer over one link;
- dcn_s: the collectives whose groups span slices, at the data-centre network's bandwidth per chip.

Overlap assumption: XLA's scheduler runs collectives asynchronously beside the matmuls and a kernel is bound by
the slower of its FLOPs and its bytes, so the step takes max(compute_s, hbm_s, ici_s + dcn_s) - communication
hidden entirely behind compute when it is shorter, exposed by what it exceeds. `serial_s` (nothing overlapped)
is reported beside it as the bound a badly scheduled program approaches. These are estimates, labelled so
wherever they are shown; only a run on the pod measures.
"""

import dataclasses

from pixelgpt import hlo

# The matrix units' share of peak on a transformer's real kernels (layouts, padding, softmax and norms between the
# matmuls), fitted to MaxText's published MFU (benchmarks/results/estimator_calibration.md).
COMPUTE_EFFICIENCY = 0.80


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures of one TPU chip. Per JAX device they are divided by the devices a chip exposes."""
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_link: float  # bytes/s one way on one inter-chip link
  dcn: float  # bytes/s of data-centre network per chip
  source: str


# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v3, /v4, /v5e, /v5p-training, /v6e) for peak,
# HBM and DCN; per-link ICI from "How to Scale Your Model" (jax-ml.github.io/scaling-book/tpus), whose per-chip
# sums match the Cloud pages (v5p: 6 links × 1.8e11 B/s both ways ≈ 1,200 GB/s; v5e: 4 × 9e10 ≈ 400 GB/s).
CHIPS = {
    "v3": Chip(123e12, 900e9, 1.0e11, 6.25e9, "cloud.google.com/tpu/docs/v3; scaling-book/tpus"),
    "v4": Chip(275e12, 1200e9, 4.5e10, 6.25e9, "cloud.google.com/tpu/docs/v4; scaling-book/tpus"),
    "v5e": Chip(197e12, 819e9, 4.5e10, 3.125e9, "cloud.google.com/tpu/docs/v5e (2 × 100 Gbps NIC per 8 chips)"),
    "v5p": Chip(459e12, 2765e9, 9.0e10, 6.25e9, "cloud.google.com/tpu/docs/v5p-training (DCN 50 Gbps per chip)"),
    "v6e": Chip(918e12, 1638e9, 9.0e10, 12.5e9, "cloud.google.com/tpu/docs/v6e; scaling-book/tpus (DCN)"),
}


def _wraps(extent: int, side: int, torus_dims: int) -> bool:
  """Whether a ring over `extent` chips of a torus axis of `side` chips has the wraparound link."""
  if extent != side:
    return False
  return side % 4 == 0 if torus_dims == 3 else side == 16


def _group_bandwidth(devices: list, group: list[int], torus: tuple, chip: Chip) -> tuple[float, int, bool]:
  """(ICI bytes/s one device can move in a ring over `group`, slices the group spans, whether it leaves the
  chip). `devices[i]` is device i of the program's device assignment."""
  members = [devices[i] for i in group if i < len(devices)]
  slices = len({getattr(d, "slice_index", 0) for d in members})
  coords = [tuple(getattr(d, "coords", (0,) * len(torus))) for d in members]
  bandwidth = 0.0
  for axis, side in enumerate(torus):
    extent = len({c[axis] for c in coords})
    if extent > 1:
      bandwidth += chip.ici_link * (2 if _wraps(extent, side, len(torus)) else 1)
  return bandwidth, slices, len(set(coords)) > 1


def _seconds(c: hlo.Collective, bandwidth: float) -> float:
  g = max(c.group_size, 1)
  if c.kind == "collective-permute":
    moved = c.bytes
  elif c.kind == "all-reduce":
    moved = 2 * c.bytes * (g - 1) / g
  else:  # all-gather, reduce-scatter, all-to-all
    moved = c.bytes * (g - 1) / g
  return c.count * moved / bandwidth if moved else 0.0


def estimate(analysis: hlo.Analysis, *, devices: list, torus: tuple, generation: str, devices_per_chip: int,
             model_flops_per_device: float, tokens_per_step: int) -> dict | None:
  """The step-time estimate of one compiled train step (per device: every device runs the same program), or None
  for a generation without published figures."""
  chip = CHIPS.get(generation)
  if chip is None:
    return None
  peak = chip.peak_flops / devices_per_chip
  compute_s = analysis.flops / (peak * COMPUTE_EFFICIENCY)
  hbm_s = analysis.hbm_bytes / (chip.hbm_bandwidth / devices_per_chip)
  ici_s = dcn_s = 0.0
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  for c in analysis.collectives:
    if c.over_dcn:  # every slice takes part: data parallelism across slices
      dcn_s += _seconds(dataclasses.replace(c, group_size=num_slices), chip.dcn / devices_per_chip)
      continue
    bandwidth, slices, off_chip = _group_bandwidth(devices, max(c.groups, key=len), torus, chip)
    if slices > 1:
      dcn_s += _seconds(dataclasses.replace(c, group_size=slices), chip.dcn / devices_per_chip)
    elif off_chip and bandwidth:
      ici_s += _seconds(c, bandwidth / devices_per_chip)
  step_s = max(compute_s, hbm_s, ici_s + dcn_s)
  terms = {"compute": compute_s, "hbm": hbm_s, "ici": ici_s, "dcn": dcn_s}
  return {
      "step_s": step_s, "mfu": model_flops_per_device / (step_s * peak), "tokens_per_sec": tokens_per_step / step_s,
      "compute_s": compute_s, "hbm_s": hbm_s,
      "ici_s": ici_s, "dcn_s": dcn_s, "serial_s": max(compute_s, hbm_s) + ici_s + dcn_s,
      "bottleneck": max(terms, key=terms.get), "collective_bytes": hlo.collective_bytes(analysis),
      "flops_per_device": analysis.flops, "hbm_bytes_per_device": analysis.hbm_bytes,
      "compute_efficiency": COMPUTE_EFFICIENCY, "chip": dataclasses.asdict(chip),
      "overlap": "collectives overlap compute: step = max(compute, hbm, ici + dcn); serial_s = none overlapped",
      "unknown_trip_counts": analysis.unknown_trip_counts,
  }

