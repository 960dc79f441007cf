"""Peak host memory of `pixelgpt probe` on all 60,000 Fashion-MNIST training images (10,000 test) with a wider
model (1 layer × 1024, at 4×4: features are pooled over positions, so their memory does not depend on the
resolution, and 16 tokens per image keep the passes short on a CPU), against the formula the README states, with
every layer (the embeddings and the final norm) in one pass over the data and with one layer per pass.

  python benchmarks/probe_memory.py       # Debian's dataset-fashion-mnist; about 15 minutes on a 2-core CPU

The model is trained for 1 step (memory does not depend on the weights). Each probe runs as its own process on one
CPU device, so its peak RSS (ru_maxrss) is its own: there the devices' memory is host memory, the worst case.
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a host-memory measurement: never libtpu's TPU probing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTH, LAYERS, RESOLUTION, BATCH = 1024, 1, 4, 256
N_TRAIN, N_TEST = 60_000, 10_000
CONFIG = ["--config", "configs/fashion_mnist.py", f"--config.model.d_model={WIDTH}", f"--config.model.n_layer={LAYERS}",
          "--config.model.n_head=8", f"--config.batch_size={BATCH}", f"--config.dataset.resolution={RESOLUTION}",
          "--config.fewshot.layers=()"]


def _pixelgpt(*args) -> str:
  return subprocess.run([sys.executable, "-m", "pixelgpt", *args], cwd=common.REPO, check=True, capture_output=True,
                        text=True).stdout


def _peak_rss_gib(*args) -> float:
  """Peak RSS of `pixelgpt ARGS` in a child process of its own (the grandchild's ru_maxrss, read after it exits)."""
  code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
  out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "pixelgpt", *args], cwd=common.REPO,
                       check=True, capture_output=True, text=True).stdout
  return int(out.split()[-1]) * 1024 / 2 ** 30  # ru_maxrss is in KiB on Linux


def main():
  m = common.machine()
  workdir = tempfile.mkdtemp(prefix="probe_memory_")
  _pixelgpt("train", *CONFIG, "--workdir", workdir, "--config.total_steps=1", "--config.eval_every=0",
            "--config.sample_every=0", "--config.checkpoint_every=1")
  padded = -(-N_TRAIN // BATCH) * BATCH
  layer_gib = padded * WIDTH * 4 / 2 ** 30  # one layer's features of the training split, float32
  baseline = _peak_rss_gib("eval", "--workdir", workdir, "--config.dataset.eval_examples=256")
  rows = []
  for label, layers_per_pass, budget in (("every layer in one pass", LAYERS + 1, "100"),
                                         ("one layer per pass", 1, f"{layer_gib * 1.01:.4f}")):
    peak = _peak_rss_gib("probe", "--workdir", workdir, "--feature_memory_gib", budget)
    rows.append({"setting": label, "feature_memory_gib": float(budget), "layers_per_pass": layers_per_pass,
                 "features_gib": layers_per_pass * layer_gib, "peak_rss_gib": peak})
    print(f"{label}: peak RSS {peak:.2f} GiB (features {layers_per_pass * layer_gib:.2f} GiB)", flush=True)
  with open(os.path.join(workdir, "probe.json")) as f:
    probe = json.load(f)
  payload = {"machine": m, "model": {"n_layer": LAYERS, "d_model": WIDTH, "resolution": RESOLUTION},
             "train_examples": N_TRAIN, "test_examples": N_TEST, "padded_rows": padded, "one_layer_gib": layer_gib,
             "baseline_rss_gib": baseline, "rows": rows, "probe_test_accuracy_after_1_step": probe["test_accuracy"]}
  print(f"-> {common.write('probe_memory', payload, markdown(payload))}")


def markdown(payload: dict) -> str:
  """The results table, and the formula the measurement gives (`--render` rebuilds it from the saved JSON)."""
  baseline, layer_gib, rows = payload["baseline_rss_gib"], payload["one_layer_gib"], payload["rows"]
  # What the peak holds beyond the baseline and the features of one pass: the classifier's working set (one
  # layer's features standardised, and the fit's temporaries), in units of one layer's features.
  extra = [r["peak_rss_gib"] - baseline - r["features_gib"] for r in rows]
  fit_layers = sum(extra) / len(extra) / layer_gib
  lines = [
      "# Probe memory: peak host RSS of `pixelgpt probe`",
      "",
      f"`python benchmarks/probe_memory.py`: Fashion-MNIST, {N_TRAIN:,} train / {N_TEST:,} test images at "
      f"{RESOLUTION}×{RESOLUTION}, a {LAYERS} × {WIDTH} model, batch {BATCH}, one CPU device (its memory is host "
      f"memory: the worst case). Machine: {common.describe(payload['machine'])}.",
      "",
      f"One layer's training features: {payload.get('padded_rows', 60_160):,} rows × {WIDTH} × 4 bytes = "
      f"{layer_gib:.3f} GiB. Baseline (the same process doing `pixelgpt eval` on 256 images: interpreter, JAX, "
      f"model, dataset): {baseline:.2f} GiB.",
      "",
      "| setting | layers per pass | features held (GiB) | peak RSS (GiB) | peak − baseline − features (GiB) |",
      "|---|---|---|---|---|",
  ]
  for r, e in zip(rows, extra):
    lines.append(f"| {r['setting']} (--feature_memory_gib {r['feature_memory_gib']:g}) | {r['layers_per_pass']} | "
                 f"{r['features_gib']:.3f} | {r['peak_rss_gib']:.2f} | {e:.2f} |")
  lines += ["", f"One pass less (a layer's features fewer) lowers the peak by "
            f"{rows[0]['peak_rss_gib'] - rows[1]['peak_rss_gib']:.2f} GiB (one layer: {layer_gib:.2f}); beyond the "
            f"features the peak holds {sum(extra) / len(extra):.2f} GiB in both settings = {fit_layers:.1f} layers' "
            "worth: the classifier fitting one layer at a time (its standardised copy and the solver's temporaries).",
            "",
            f"Formula: peak memory ≈ baseline + (layers_per_pass + {fit_layers:.0f}) × N × d × 4 bytes, divided over "
            "the data-parallel devices (on a CPU, host memory; on accelerators, device memory, with one batch on "
            "the host)."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  if sys.argv[1:] == ["--render"]:
    with open(os.path.join(common.RESULTS, "probe_memory.json")) as f:
      saved = json.load(f)
    print(f"-> {common.write('probe_memory', saved, markdown(saved))}")
  else:
    main()
