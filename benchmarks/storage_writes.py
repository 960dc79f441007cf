"""What logging costs on a gs:// workdir: objects and bytes uploaded per log step for metrics.jsonl and TensorBoard,
pixelgpt's writer (a bounded tail per log step, metrics.jsonl rewritten at checkpoint saves, one TensorBoard event
file per checkpoint interval) against rewriting metrics.jsonl whole at every log step, which is what an append
becomes on object storage.

Against fake-gcs-server on loopback (tests/gcs_server.py): request and byte counts are what Cloud Storage would
receive; seconds are loopback seconds, a lower bound (a real bucket adds ~20-100 ms of latency per request).

  python benchmarks/storage_writes.py [--steps 2000 --checkpoint_every 50]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.gcs_server import LocalGcs  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = "bench"
# The keys a train log line carries (train.run), every 10th line with eval/loss.
KEYS = ("train/loss", "grad_norm", "lr", "perf/step_time_s", "perf/tokens_per_sec", "perf/tflops_per_device",
        "perf/mfu")


def _line(step: int) -> dict:
  metrics = {k: 1.0 / (step + i + 1) for i, k in enumerate(KEYS)}
  if step % 10 == 0:
    metrics["eval/loss"] = 1.5 + 1.0 / step
  return metrics


def measure_pixelgpt(server: LocalGcs, steps: int, checkpoint_every: int) -> dict:
  from pixelgpt import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from pixelgpt import storage  # pylint: disable=g-import-not-at-top
  storage.usable(f"gs://{BUCKET}/ours", what="--workdir")  # as the CLI does first: checks the bucket
  writer = metrics_lib.MetricWriter(f"gs://{BUCKET}/ours", total_steps=steps, initial_step=0, enabled=True)
  log_s, seal_s, tail_bytes, history_bytes, tb_s, tb_bytes = [], [], [], [], [], []
  for step in range(1, steps + 1):
    start = time.perf_counter()
    writer.write(step, _line(step))
    log_s.append(time.perf_counter() - start)
    tail_bytes.append(server.objects(BUCKET, "ours/metrics.tail.jsonl").get("ours/metrics.tail.jsonl", 0))
    if step % checkpoint_every == 0:
      # tensorboardX uploads its event file whole at each flush (every 120 s by default): time the last one of the
      # interval, which the seal then closes.
      start = time.perf_counter()
      writer._tb.flush()  # pylint: disable=protected-access
      tb_s.append(time.perf_counter() - start)
      tb_bytes.append(max(size for name, size in server.objects(BUCKET, "ours/tb/").items()))
      start = time.perf_counter()
      writer.seal(step)
      seal_s.append(time.perf_counter() - start)
      history_bytes.append(server.objects(BUCKET, "ours/metrics.jsonl")["ours/metrics.jsonl"])
  writer.close()
  assert [m["step"] for m in metrics_lib.read_metrics(f"gs://{BUCKET}/ours")] == list(range(1, steps + 1))
  uploaded = sum(tail_bytes) + sum(history_bytes)
  return {"log_write_s_median": statistics.median(log_s), "log_write_s_max": max(log_s),
          "seal_s_median": statistics.median(seal_s), "seal_s_last": seal_s[-1],
          "tail_bytes_max": max(tail_bytes), "history_bytes_final": history_bytes[-1],
          "metrics_bytes_uploaded": uploaded, "metrics_bytes_per_log_step": uploaded / steps,
          "tb_flush_s_median": statistics.median(tb_s), "tb_event_file_bytes_max": max(tb_bytes)}


def measure_rewrite_every_step(steps: int) -> dict:
  """metrics.jsonl rewritten whole at every log step: the only way to 'append' to an object."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from pixelgpt import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  path = epath.Path(f"gs://{BUCKET}/naive/metrics.jsonl")
  lines, seconds, uploaded = [], [], 0
  for step in range(1, steps + 1):
    lines.append({"step": step, **_line(step)})
    text = metrics_lib._lines(lines)  # pylint: disable=protected-access
    start = time.perf_counter()
    path.write_text(text)
    seconds.append(time.perf_counter() - start)
    uploaded += len(text)
  return {"log_write_s_first_100_median": statistics.median(seconds[:100]),
          "log_write_s_last_100_median": statistics.median(seconds[-100:]), "final_bytes": len(text),
          "metrics_bytes_uploaded": uploaded, "metrics_bytes_per_log_step": uploaded / steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000, help="log steps")
  parser.add_argument("--checkpoint_every", type=int, default=50,
                      help="log steps between checkpoint saves (below 100, where the writer seals by itself)")
  args = parser.parse_args()
  server = LocalGcs()
  # Before google.auth and the storage clients are imported: some read these variables once, at import.
  os.environ.update(server.env)
  server.create_bucket(BUCKET)
  import common  # pylint: disable=g-import-not-at-top
  try:
    ours = measure_pixelgpt(server, args.steps, args.checkpoint_every)
    naive = measure_rewrite_every_step(args.steps)
  finally:
    server.stop()
  machine = common.machine()
  payload = {"machine": machine, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
             "pixelgpt": ours, "rewrite_every_step": naive}
  ms = lambda s: f"{1000 * s:.1f} ms"
  markdown = "\n".join([
      "# Logging to a gs:// workdir", "",
      f"`python benchmarks/storage_writes.py --steps {args.steps} --checkpoint_every {args.checkpoint_every}`: "
      f"{args.steps} log lines ({len(KEYS)} metrics, eval/loss every 10th), a checkpoint save every "
      f"{args.checkpoint_every} log steps, against fake-gcs-server on loopback (memory backend). Measured on "
      f"{common.describe(machine)}. Bytes and objects are what a bucket receives; seconds are loopback seconds, a "
      "lower bound for a real bucket.", "",
      "| per log step | pixelgpt (tail + rewrite at checkpoint) | rewrite metrics.jsonl every log step |",
      "|---|---:|---:|",
      "| requests | 1 upload of the tail; at a checkpoint 1 upload of metrics.jsonl and 1 delete | 1 upload |",
      f"| bytes uploaded (mean over the run) | {ours['metrics_bytes_per_log_step']:,.0f} | "
      f"{naive['metrics_bytes_per_log_step']:,.0f} |",
      f"| write time, median | {ms(ours['log_write_s_median'])} | first 100: "
      f"{ms(naive['log_write_s_first_100_median'])}, last 100: {ms(naive['log_write_s_last_100_median'])} |",
      f"| total metrics bytes uploaded | {ours['metrics_bytes_uploaded']:,} | {naive['metrics_bytes_uploaded']:,} |",
      "",
      f"pixelgpt's largest tail object: {ours['tail_bytes_max']:,} bytes; metrics.jsonl at the end: "
      f"{ours['history_bytes_final']:,} bytes, rewritten at each seal in {ms(ours['seal_s_median'])} (median; "
      f"last {ms(ours['seal_s_last'])}, which includes closing one TensorBoard event file and opening the next). "
      f"TensorBoard: one event file per checkpoint interval, at most {ours['tb_event_file_bytes_max']:,} bytes, "
      f"uploaded whole at each flush (every 120 s and at the seal) in {ms(ours['tb_flush_s_median'])} (median).",
      ""])
  print(markdown)
  print(common.write("storage_writes", payload, markdown))


if __name__ == "__main__":
  main()
