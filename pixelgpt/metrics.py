"""FLOPs and MFU accounting, and the metric writers (progress bar, W/metrics.jsonl, TensorBoard).

MFU = model FLOPs per step / (step time × devices × peak FLOP/s per device), counting model FLOPs only
(rematerialisation is not credited), as MaxText and PaLM do.
"""

import io
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixelgpt import storage

# Dense bf16 peak FLOP/s per JAX device, by `device.device_kind` prefix. A v2/v3 device is one TensorCore
# (half a chip); v4 and v5p devices are megacore chips.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def flops_per_token(model_cfg) -> float:
  """Training FLOPs per token: 3 × forward (backward = 2 × forward).

  Forward per token and layer: 2·(4d² + 2·r·d²) for the q/k/v/out and MLP matmuls, plus 2·2·T·d for the
  scores and the weighted sum of values, halved when causal (only the lower triangle is needed); plus 2·d·K
  for the head. Embedding lookups and norms are not counted.
  """
  d, r, t, k = model_cfg.d_model, model_cfg.mlp_ratio, model_cfg.seq_len, model_cfg.vocab_size
  attention = 4 * t * d * (0.5 if model_cfg.causal else 1.0)
  per_layer = 2 * (4 + 2 * r) * d * d + attention
  return 3.0 * (model_cfg.n_layer * per_layer + 2 * d * k)


_cpu_peak_cache: dict = {}


def measure_cpu_matmul_peak(sizes: tuple = (1024, 2048), repeats: int = 5, *, cached: bool = True) -> float:
  """Best f32 matmul FLOP/s XLA reaches on this host (all cores), the denominator of MFU on CPU.

  The fastest of `repeats` square matmuls at each size: which size runs fastest depends on the host's caches (on the
  2-core EPYC these numbers come from, 1024³ and 2048³ were within 5% of each other and larger ones slower), and the
  highest rate seen keeps MFU from being flattered by a slow measurement. On a shared machine, measure it
  (cached=False) in the same conditions as the step it divides.
  """
  if cached and "peak" in _cpu_peak_cache:
    return _cpu_peak_cache["peak"]
  cpu = jax.devices("cpu")[0]
  matmul = jax.jit(jnp.matmul)  # one jitted function object: repeated measurements reuse its compilations
  best = 0.0
  for size in sizes:
    a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
    matmul(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
  _cpu_peak_cache["peak"] = best
  return best


def peak_flops_per_device(device=None) -> float:
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    # Virtual CPU devices share the host's cores: each gets an equal share of the measured peak.
    return measure_cpu_matmul_peak() / jax.local_device_count()
  for prefix, peak in sorted(PEAK_FLOPS_PER_DEVICE.items(), key=lambda kv: -len(kv[0])):
    if device.device_kind.startswith(prefix):
      return peak
  return float("nan")


def perf_metrics(step_time_s: float, tokens_per_step: int, model_cfg, num_devices: int, peak: float) -> dict:
  flops = flops_per_token(model_cfg) * tokens_per_step
  tflops_per_device = flops / step_time_s / num_devices / 1e12
  return {
      "perf/step_time_s": step_time_s,
      "perf/tokens_per_sec": tokens_per_step / step_time_s,
      "perf/tflops_per_device": tflops_per_device,
      "perf/mfu": tflops_per_device * 1e12 / peak,
  }


# metrics.jsonl on object storage, which has no appends: the file holds every step logged up to the last *seal*
# (a checkpoint save, or MAX_TAIL_LINES lines) and is rewritten whole then; the lines logged since live in a small
# tail file rewritten whole at each log step. A log step thus uploads at most MAX_TAIL_LINES lines, and the
# growing file is uploaded only at checkpoint saves, next to a checkpoint that is far larger than it.
METRICS_FILE = "metrics.jsonl"
TAIL_FILE = "metrics.tail.jsonl"
MAX_TAIL_LINES = 100


def _read_lines(path) -> list[dict]:
  # No exists() check first: the writer may delete the tail between the check and the read (a seal).
  try:
    text = path.read_text()
  except FileNotFoundError:
    return []
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_logged(w) -> tuple[list[dict], list[dict]]:
  """(every step logged, whether there was a tail), metrics.jsonl's lines then the tail's later ones.

  The tail is read first: the writer replaces metrics.jsonl before it clears the tail, so a reader racing a seal
  sees each line in one file or the other, never in neither.
  """
  tail = _read_lines(w / TAIL_FILE)
  history = _read_lines(w / METRICS_FILE)
  last = history[-1]["step"] if history else -1
  return history + [m for m in tail if m["step"] > last], bool(tail)


def read_metrics(workdir) -> list[dict]:
  """Every logged step of the run in `workdir` exactly once, in order."""
  return _read_logged(storage.path(workdir))[0]


def _lines(metrics: list[dict]) -> str:
  return "".join(json.dumps(m) + "\n" for m in metrics)


class _ObjectEventFile:
  """A TensorBoard event file on object storage, for tensorboardX: kept in memory and uploaded whole through epath
  when tensorboardX flushes (every 120 s and at close) and only if events were added since the last upload.
  (tensorboardX's own gs:// writer uploads again when garbage-collected, after close, and retries for minutes when
  the bucket has gone away.)"""

  def __init__(self, path: str):
    self._path, self._buffer, self._uploaded = storage.path(path), io.BytesIO(), 0

  def write(self, data: bytes):
    self._buffer.write(data)

  def flush(self):
    if self._buffer.tell() != self._uploaded:
      storage.write_atomic(self._path, self._buffer.getvalue())
      self._uploaded = self._buffer.tell()

  def close(self):
    self.flush()


class _ObjectEventFiles:
  """tensorboardX's writer-factory interface for a URL scheme."""

  def open(self, path: str) -> _ObjectEventFile:
    return _ObjectEventFile(path)

  def directory_check(self, path: str):
    del path  # object stores have no directories


def tensorboard_writer(workdir, step: int, *, purge: bool = False, suffix: str = ""):
  """A tensorboardX SummaryWriter on W/tb (local or gs://) whose event file is named after `step`."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory("gs", _ObjectEventFiles())
  # Zero-padded steps in the name keep event files in the order TensorBoard reads them (by name).
  return SummaryWriter(os.fspath(storage.path(workdir) / "tb"), purge_step=step if purge else None,
                       filename_suffix=f".{step:09d}{suffix}")


def add_to_tensorboard(workdir, step: int, kind: str, *, scalars: dict | None = None,
                       images: dict | None = None):
  """What a command (eval, probe, sample) found about the checkpoint at `step`, as its own event file in W/tb
  (named after `kind`: the trainer's files are never rewritten by another process). Best effort: a workdir the
  user may read but not write (someone else's bucket) gets one line on stderr, and the command's result stands."""
  try:
    tb = tensorboard_writer(workdir, step, suffix=f".{kind}")
    for tag, value in (scalars or {}).items():
      tb.add_scalar(tag, float(value), step)
    for tag, grid in (images or {}).items():
      tb.add_image(tag, grid, step, dataformats="HWC")
    tb.close()
  except Exception as e:  # pylint: disable=broad-except  (any storage failure: local, gcsfs or google-cloud)
    print(f"pixelgpt: note: could not add the {kind} result to {storage.path(workdir) / 'tb'}: {e}",
          file=sys.stderr)


def tag(name: str) -> str:
  """A TensorBoard tag part from a free name ('folder:/data/x' -> 'folder_data_x')."""
  return "_".join(part for part in re.split(r"[^A-Za-z0-9]+", name) if part)


class MetricWriter:
  """Writes on process 0 only: metrics.jsonl (one object per logged step), TensorBoard, a progress bar.

  A run resumed from step `initial_step` first drops what was logged after it (the steps it is about to redo), so
  every step appears once. TensorBoard gets a new event file at each seal (an event file on object storage is
  uploaded whole at every flush, so this bounds each upload too) and, on resume, purges the redone steps.
  """

  def __init__(self, workdir, *, total_steps: int, initial_step: int, enabled: bool):
    self.enabled = enabled
    self._bar = self._tb = None
    if not enabled:
      return
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._dir = storage.path(workdir)
    logged, had_tail = _read_logged(self._dir)
    self._history = [m for m in logged if m["step"] <= initial_step]
    self._tail = []
    if len(self._history) != len(logged) or had_tail:
      storage.write_atomic(self._dir / METRICS_FILE, _lines(self._history))
      (self._dir / TAIL_FILE).unlink(missing_ok=True)
    self._open_tensorboard(initial_step, purge=initial_step > 0)
    self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", file=sys.stderr,
                     dynamic_ncols=True, mininterval=1.0)

  def _open_tensorboard(self, step: int, *, purge: bool = False):
    self._tb = tensorboard_writer(self._dir, step, purge=purge)

  def advance(self, steps: int = 1):
    if self._bar is not None:
      self._bar.update(steps)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    for k, v in clean.items():
      if np.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tail.append({"step": step, **clean})
    if len(self._tail) >= MAX_TAIL_LINES:
      self.seal(step)
    else:
      storage.write_atomic(self._dir / TAIL_FILE, _lines(self._tail))
    shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in clean.items()
             if k in ("train/loss", "eval/loss", "perf/mfu", "perf/tokens_per_sec")}
    self._bar.set_postfix(shown, refresh=False)

  def image(self, step: int, tag: str, grid: np.ndarray):
    """A [H, W, C] uint8 image (a sample grid) in TensorBoard at `step`."""
    if self.enabled:
      self._tb.add_image(tag, grid, step, dataformats="HWC")

  def seal(self, step: int):
    """Moves the tail into metrics.jsonl (rewritten whole) and starts a new TensorBoard event file."""
    if self.enabled and self._tail:
      self._write_history()
      self._tb.close()
      self._open_tensorboard(step + 1)

  def _write_history(self):
    self._history += self._tail
    self._tail = []
    storage.write_atomic(self._dir / METRICS_FILE, _lines(self._history))
    (self._dir / TAIL_FILE).unlink(missing_ok=True)

  def message(self, text: str):
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self):
    if self.enabled:
      if self._tail:
        self._write_history()
      self._bar.close()
      self._tb.close()
