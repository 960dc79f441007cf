"""Does a bf16 key/value cache make decoding faster on XLA:CPU? It halves the bytes each position reads, so a
memory-bound decoder should gain up to 2×; this measures one layer's cached attention the way the sampler runs it
(a compiled loop over positions carrying the cache, written in place, every chunk read: the last chunk's
positions), in f32 as pixelgpt does and in five bf16 formulations.

  JAX_PLATFORMS=cpu python benchmarks/kv_cache_dtype.py      # 64 images × 8 heads × 32, T=1024, 8 chunks

Formulations: `dot` is model.Attention._attend_cached's batched mat-vec einsums; bf16 `dot` hands XLA bf16 × bf16 →
f32 dots; `uint16` stores the bf16 bits as integers (XLA:CPU writes bf16 in place only through a round trip via
f32, integers directly) and widens them to f32 by a 16-bit shift before the dots; `reduce` is a multiply + sum
instead of dots (keys [.., T, H]), and `reduce, keys transposed` stores keys [.., H, T] so that both sums run along
a non-minor axis.
"""

import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import common  # benchmarks/common.py, next to this script

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 64, "Images decoded at once.")
flags.DEFINE_integer("positions", 32, "Positions per timed call (in the last cache chunk).")
flags.DEFINE_integer("rounds", 5, "Timed calls per formulation, interleaved; the median is reported.")
flags.DEFINE_string("out", "kv_cache_dtype", "Results name under benchmarks/results/ ('' writes nothing).")

HEADS, HEAD_DIM, LENGTH, CHUNKS = 8, 32, 1024, 8
FORMULATIONS = {  # name: (stored dtype, how it is read, keys transposed)
    "float32, dot (pixelgpt)": ("float32", "dot", False),
    "bfloat16, dot": ("bfloat16", "dot", False),
    "bfloat16 as uint16, shift, dot": ("uint16", "dot", False),
    "bfloat16 as uint16, shift, reduce": ("uint16", "reduce", False),
    "bfloat16 as uint16, shift, reduce, keys transposed": ("uint16", "reduce", True),
    "float32, reduce, keys transposed": ("float32", "reduce", True),
}


def _store(x, stored: str):
  if stored == "float32":
    return x
  x = x.astype(jnp.bfloat16)
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if stored == "uint16" else x


def _load(chunk, stored: str, dot: bool):
  if stored == "uint16":  # bf16 bits are f32's upper half
    return jax.lax.bitcast_convert_type(chunk.astype(jnp.uint32) << 16, jnp.float32)
  return chunk if dot else chunk.astype(jnp.float32)


def decode_loop(images: int, positions: int, stored: str, read: str, transposed: bool):
  """A jitted loop of `positions` decoding steps of one attention layer over a cache carried in place."""
  size = LENGTH // CHUNKS
  dot = read == "dot"

  def step(i, carry):
    keys, values, out = carry
    q = jnp.sin(out + i.astype(jnp.float32))  # the next query depends on this output: no step can be skipped
    position = LENGTH - positions + i
    offset = position - (CHUNKS - 1) * size
    new = _store(0.5 * q, stored)
    key_new = new[..., None] if transposed else new[:, :, None, :]
    keys = keys[:-1] + (jax.lax.dynamic_update_slice_in_dim(keys[-1], key_new, offset, 3 if transposed else 2),)
    values = values[:-1] + (jax.lax.dynamic_update_slice_in_dim(values[-1], new[:, :, None, :], offset, 2),)
    query = q.astype(jnp.bfloat16) if stored == "bfloat16" else q
    if dot:
      scores = [jnp.einsum("bnh,bnkh->bnk", query, _load(k, stored, dot), preferred_element_type=jnp.float32)
                for k in keys]
    elif transposed:
      scores = [jnp.sum(q[..., None] * _load(k, stored, dot), axis=2) for k in keys]
    else:
      scores = [jnp.sum(q[:, :, None, :] * _load(k, stored, dot), axis=3) for k in keys]
    scores = jnp.where(jnp.arange(LENGTH) <= position, jnp.concatenate(scores, -1) / math.sqrt(HEAD_DIM),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    chunks = [probs[..., j * size:(j + 1) * size] for j in range(CHUNKS)]
    if dot:
      probs_in = [p.astype(jnp.bfloat16) if stored == "bfloat16" else p for p in chunks]
      out = sum(jnp.einsum("bnk,bnkh->bnh", p, _load(v, stored, dot), preferred_element_type=jnp.float32)
                for p, v in zip(probs_in, values))
    else:
      out = sum(jnp.sum(p[..., None] * _load(v, stored, dot), axis=2) for p, v in zip(chunks, values))
    return keys, values, out

  dtype = jnp.dtype(stored)
  key_shape = (images, HEADS, HEAD_DIM, size) if transposed else (images, HEADS, size, HEAD_DIM)
  cache = (tuple(jnp.zeros(key_shape, dtype) for _ in range(CHUNKS)),
           tuple(jnp.zeros((images, HEADS, size, HEAD_DIM), dtype) for _ in range(CHUNKS)),
           jnp.zeros((images, HEADS, HEAD_DIM), jnp.float32))
  run = jax.jit(lambda k, v, o: jax.lax.fori_loop(0, positions, step, (k, v, o)), donate_argnums=(0, 1))
  holder = {"carry": jax.block_until_ready(run(*cache))}  # compiled and warmed

  def call():
    holder["carry"] = jax.block_until_ready(run(*holder["carry"]))

  return call, 2 * images * HEADS * LENGTH * HEAD_DIM * dtype.itemsize


def main(argv):
  del argv
  machine = common.machine(measure=True)
  calls, sizes = {}, {}
  for name, (stored, read, transposed) in FORMULATIONS.items():
    calls[name], sizes[name] = decode_loop(FLAGS.images, FLAGS.positions, stored, read, transposed)
  times = common.interleaved(calls, rounds=FLAGS.rounds, warmup=1)
  machine["load_average_1m_after"] = round(common.load_average(), 2)
  base = common.median(times["float32, dot (pixelgpt)"])
  results = []
  for name in FORMULATIONS:
    per = common.median(times[name]) / FLAGS.positions
    results.append({"formulation": name, "ms_per_position": round(per * 1e3, 2), "cache_mb": sizes[name] / 1e6,
                    "cache_gb_per_s": round(sizes[name] / per / 1e9, 1),
                    "speed_vs_f32": round(base / FLAGS.positions / per, 2)})
  command = "python benchmarks/kv_cache_dtype.py"
  lines = ["# A bf16 key/value cache on XLA:CPU: one attention layer's decoding step", "",
           f"`{command}`: {FLAGS.images} images × {HEADS} heads × {HEAD_DIM}, T={LENGTH} in {CHUNKS} chunks, "
           f"{FLAGS.positions} positions per call in the last chunk (every chunk read), medians of {FLAGS.rounds} "
           "interleaved calls. GB/s: the whole cache (keys and values) over the time of one position.",
           f"Machine ({machine['kind']}): {common.describe(machine)}.", "",
           "| formulation | ms per position | cache MB | cache GB/s | speed vs f32 |", "|---|---|---|---|---|"]
  lines += [f"| {r['formulation']} | {r['ms_per_position']} | {r['cache_mb']:.0f} | {r['cache_gb_per_s']} | "
            f"{r['speed_vs_f32']}× |" for r in results]
  text = "\n".join(lines) + "\n"
  print(text)
  if FLAGS.out:
    print("->", common.write(f"{FLAGS.out}.{machine['kind']}", {"command": command, "machine": machine,
                                                                 "results": results}, text))


if __name__ == "__main__":
  app.run(main)
