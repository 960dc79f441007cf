"""A path to AMX for pixelgpt's matmuls, measured: bf16 x bf16 -> f32 GEMMs through XLA:CPU's own dots against a
jax.ffi call into oneMKL's cblas_gemm_bf16bf16f32 (benchmarks/ffi/bf16_gemm.cc, which oneMKL runs on AMX tiles where
the CPU has them), GEMM by GEMM at the benchmark model's shapes and then in its whole bf16 train step.

  pip install mkl                                  # oneMKL's runtime (a wheel); g++ builds the FFI library
  JAX_PLATFORMS=cpu python benchmarks/bf16_gemm.py

GEMMs: each of the 'small' shape's Dense dots (batch 8 × T=1024 rows) in its three forms — forward X·W, the input
gradient dY·Wᵀ and the weight gradient Xᵀ·dY — written as model._bf16_dot writes them for XLA (transposes folded
into the dot), then as FFI calls (MKL's transpose flags, no copies), then f32 XLA and PyTorch bf16 for scale.
Train step: the same step (4 × 256 × 8 heads, T=1024, batch 8, bf16) with model._bf16_dot's three dots replaced by
FFI calls, interleaved round by round with the native step, and both steps' losses after the same batches.
A prototype, not adopted: an FFI call is opaque to XLA's SPMD partitioner (a sharded model would need a custom
partitioning rule per dot), and the library is built here, not by `pip install -e .`.
"""

import ctypes
import functools
import math
import os
import subprocess
import sys
import tempfile

# oneMKL's OpenMP threads spin for 200 ms after each call by default, taking the cores from XLA's and PyTorch's own
# threads in the rounds that follow (every side measured 2-5x slow); set before MKL loads.
os.environ.setdefault("KMP_BLOCKTIME", "0")

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common  # benchmarks/common.py, next to this script
from pixelgpt import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 5, "Timed rounds (the median is reported); each GEMM's best of --repeats per round.")
flags.DEFINE_integer("repeats", 5, "Calls per GEMM per round.")
flags.DEFINE_integer("steps", 5, "Timed train steps per side (after 2 warm-up steps).")
flags.DEFINE_string("out", "bf16_gemm", "Results name under benchmarks/results/ ('' writes nothing).")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ffi", "bf16_gemm.cc")
TARGET = "pixelgpt_bf16_gemm"


def build() -> str:
  """Compiles the FFI library against jaxlib's headers and the mkl wheel's libmkl_rt; returns its path."""
  lib_dir = os.path.join(sys.prefix, "lib")
  runtime = [name for name in sorted(os.listdir(lib_dir)) if name.startswith("libmkl_rt.so")]
  if not runtime:
    raise SystemExit(f"no libmkl_rt in {lib_dir}: pip install mkl")
  out = os.path.join(tempfile.mkdtemp(), "libbf16_gemm.so")
  subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type", "-Wno-attributes",
                  "-I", jax.ffi.include_dir(), SOURCE, "-o", out,
                  os.path.join(lib_dir, runtime[0]), f"-Wl,-rpath,{lib_dir}"], check=True)
  return out


def register(path: str):
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Bf16GemmHandler), platform="cpu")


def gemm(a, b, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) · op(b) for 2-D bf16 a, b, accumulated and returned in f32 by MKL."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ffi_dot(x, w, contract: int):
  """model._bf16_dot with its three GEMMs as FFI calls: x [..., C...] · w [C..., F...] in f32."""
  return _ffi_forward(x, w, contract)[0]


def _as_matrices(x, w, contract: int):
  inner = math.prod(w.shape[:contract])
  return x.reshape(-1, inner), w.reshape(inner, -1)


def _ffi_forward(x, w, contract: int):
  x2, w2 = _as_matrices(x, w, contract)
  return gemm(x2, w2).reshape(x.shape[:x.ndim - contract] + w.shape[contract:]), (x, w)


def _ffi_backward(contract: int, residuals, d_y):
  x, w = residuals
  x2, w2 = _as_matrices(x, w, contract)
  d_y2 = d_y.astype(x.dtype).reshape(x2.shape[0], w2.shape[1])
  d_x = gemm(d_y2, w2, transpose_b=True).reshape(x.shape)
  d_w = gemm(x2, d_y2, transpose_a=True).reshape(w.shape)
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


ffi_dot.defvjp(_ffi_forward, _ffi_backward)


def gemm_shapes(config) -> dict[str, tuple[int, int, int]]:
  """(rows, inner, outer) of each distinct Dense dot of the model: X [rows, inner] · W [inner, outer]."""
  m = config.model
  rows = config.batch_size * config.dataset.resolution ** 2
  return {"attention projections (q, k, v, out)": (rows, m.d_model, m.d_model),
          "mlp fc": (rows, m.d_model, m.mlp_ratio * m.d_model), "mlp proj": (rows, m.mlp_ratio * m.d_model, m.d_model),
          "head": (rows, m.d_model, config.palette.size), "2048³": (2048, 2048, 2048)}


# Each form: which two of X [rows, inner], W [inner, outer], dY [rows, outer] it multiplies, and how XLA (as
# model._bf16_dot writes it), the FFI call and PyTorch compute it.
_F32 = {"preferred_element_type": jnp.float32}
FORMS = {
    "forward X·W": (("x", "w"), lambda a, b: jnp.einsum("rk,kn->rn", a, b, **_F32), gemm, lambda a, b: a @ b),
    "input gradient dY·Wᵀ": (("d_y", "w"), lambda a, b: jnp.einsum("rn,kn->rk", a, b, **_F32),
                             functools.partial(gemm, transpose_b=True), lambda a, b: a @ b.T),
    "weight gradient Xᵀ·dY": (("x", "d_y"), lambda a, b: jnp.einsum("rk,rn->kn", a, b, **_F32),
                              functools.partial(gemm, transpose_a=True), lambda a, b: a.T @ b),
}


def measure_gemms(config, rounds: int, repeats: int) -> list[dict]:
  import torch  # pylint: disable=g-import-not-at-top
  rows_out = []
  for name, (rows, inner, outer) in gemm_shapes(config).items():
    rng = np.random.default_rng(0)
    stored = {k: rng.standard_normal(shape, np.float32)
              for k, shape in (("x", (rows, inner)), ("w", (inner, outer)), ("d_y", (rows, outer)))}
    for form, (operands, xla_fn, ffi_fn, torch_fn) in FORMS.items():
      flops = 2 * rows * inner * outer
      bf16, f32 = (tuple(jnp.asarray(stored[k], dtype) for k in operands) for dtype in (jnp.bfloat16, jnp.float32))
      xla, ffi = jax.jit(xla_fn), jax.jit(ffi_fn)
      torch_args = tuple(torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in bf16)
      reference = xla(*bf16)
      check = float(jnp.max(jnp.abs(ffi(*bf16) - reference)) / jnp.max(jnp.abs(reference)))
      sides = {"xla_bf16": lambda: xla(*bf16).block_until_ready(),
               "ffi_mkl_bf16": lambda: ffi(*bf16).block_until_ready(),
               "xla_f32": lambda: xla(*f32).block_until_ready(), "torch_bf16": lambda: torch_fn(*torch_args)}
      times = common.interleaved(sides, rounds=rounds, warmup=1, settle_s=0.2, repeats=repeats)
      row = {"dot": name, "form": form, "shape": [rows, inner, outer], "max_relative_difference": check}
      row.update({f"{k}_gflops": round(flops / common.median(v) / 1e9, 1) for k, v in times.items()})
      print(row, flush=True)
      rows_out.append(row)
  return rows_out


def measure_step(config, steps: int, warmup: int = 2) -> dict:
  """The bf16 train step, native (model._bf16_dot) and with its dots as FFI calls, interleaved."""
  batches = common.random_tokens(config, 2)
  sides, losses, native = {}, {}, model_lib._bf16_dot  # pylint: disable=protected-access
  for name, dot in (("native", native), ("ffi_mkl", ffi_dot)):
    model_lib._bf16_dot = dot  # pylint: disable=protected-access  (Dense reads it when the step is traced)
    try:
      sides[name], losses[name], _ = common.pixelgpt_trainer(config, batches)
    finally:
      model_lib._bf16_dot = native  # pylint: disable=protected-access
  times = common.interleaved(sides, rounds=steps, warmup=warmup)
  return {k: {"step_s": round(common.median(times[k]), 3), "loss_after": round(losses[k](), 4),
              "steps": warmup + steps} for k in sides}


def markdown(config, gemms: list[dict], step: dict, machine: dict, command: str) -> str:
  lines = [
      "# bf16 GEMMs on CPU: XLA's own dots vs oneMKL (AMX where present) through jax.ffi", "",
      f"`{command}`: GFLOP/s, medians of {FLAGS.rounds} interleaved rounds (each the best of {FLAGS.repeats} calls). "
      "XLA bf16 is bf16 × bf16 → f32 written as pixelgpt's Dense writes it on CPU (model._bf16_dot); FFI is "
      "cblas_gemm_bf16bf16f32 with MKL's transpose flags; PyTorch bf16 is `a @ b` (oneDNN). Max relative "
      "difference: FFI vs XLA bf16, over the largest output. A weight gradient on its own is one XLA runs in f32 "
      "between converts (its transpose folded into the dot); inside the train step XLA copies the transposed "
      "operand and runs it in bf16, and independent dots overlap, so the step table is the one that decides.",
      f"Machine ({machine['kind']}): {common.describe(machine)}.", "",
      "| dot | form | rows × inner × outer | XLA bf16 | FFI MKL bf16 | XLA f32 | PyTorch bf16 | max rel. diff |",
      "|---|---|---|---|---|---|---|---|"]
  for g in gemms:
    lines.append(f"| {g['dot']} | {g['form']} | {' × '.join(map(str, g['shape']))} | {g['xla_bf16_gflops']} | "
                 f"{g['ffi_mkl_bf16_gflops']} | {g['xla_f32_gflops']} | {g['torch_bf16_gflops']} | "
                 f"{g['max_relative_difference']:.1e} |")
  m = config.model
  lines += ["", f"Train step, {m.n_layer} layers × d {m.d_model} × {m.n_head} heads, "
            f"T={config.dataset.resolution ** 2}, "
            f"batch {config.batch_size}, bf16 (medians of {FLAGS.steps} interleaved steps after 2 warm-up):", "",
            "| Dense dots | step (s) | loss after the same batches |", "|---|---|---|"]
  lines += [f"| {name} | {r['step_s']} | {r['loss_after']} |" for name, r in step.items()]
  ratio = step["native"]["step_s"] / step["ffi_mkl"]["step_s"]
  lines += ["", f"FFI step / native step speed: **{ratio:.2f}×**.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  register(build())
  config = common.shape_config("small", dtype="bfloat16")
  machine = common.machine(measure=True)
  gemms = measure_gemms(config, FLAGS.rounds, FLAGS.repeats)
  step = measure_step(config, FLAGS.steps)
  machine["load_average_1m_after"] = round(common.load_average(), 2)
  command = "python benchmarks/bf16_gemm.py"
  text = markdown(config, gemms, step, machine, command)
  print(text)
  if FLAGS.out:
    print("->", common.write(f"{FLAGS.out}.{machine['kind']}", {"command": command, "machine": machine,
                                                                 "gemms": gemms, "train_step": step}, text))


if __name__ == "__main__":
  app.run(main)
