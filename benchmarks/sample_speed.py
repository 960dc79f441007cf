"""Sampling speed: pixelgpt's key/value-cache sampler against transformers' `generate` (use_cache=True) for the same
model and weights, in one process, calls interleaved so that both see the same load.

  JAX_PLATFORMS=cpu python benchmarks/sample_speed.py        # 4 × 256 × 8 heads, 32×32, K=512: 8, 64, 256 images

Each pixelgpt time is also read against the memory roofline: the bytes the decode must read (decode_bytes) over
the bandwidth XLA reaches reading memory on this machine (common.memory_bandwidth).

Both draw every one of the T=1024 tokens of an image from the full softmax (temperature 1, top_k 0) starting from the
start-of-sequence token. pixelgpt: `train.setup(...).sample` (one compiled lax.fori_loop, cache preallocated);
transformers: `ImageGPTForCausalImageModeling.generate(do_sample=True, top_k=0, use_cache=True)`, float32 eager.
"""

from absl import app
from absl import flags
import jax
import numpy as np

import common  # benchmarks/common.py, next to this script
from pixelgpt import config as config_lib
from pixelgpt import model as model_lib
from pixelgpt import sharding as sharding_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(common.SHAPES), "Model shape (benchmarks/common.py SHAPES).")
flags.DEFINE_list("images", ["8", "64", "256"], "Numbers of images sampled per call.")
flags.DEFINE_integer("transformers_max_images", 64, "Time transformers' generate up to this many images per call "
                     "(at 256 one call takes ~7 minutes on a 2-core CPU).")
flags.DEFINE_integer("rounds", 2, "Timed calls per side and size; the median is reported.")
flags.DEFINE_string("out", "sample_speed", "Results name under benchmarks/results/ ('' writes nothing).")


def decode_bytes(config, images: int, cache_itemsize: int = 4, param_itemsize: int = 4) -> float:
  """Bytes one call of the cached sampler must read from memory: at each of the T positions every weight once
  (shared by the batch) and, per layer and image, the keys and values of the cache chunks the position attends to
  (chunks <= its own: model.Attention._attend_cached). Writes (one key and value per position) are negligible."""
  m, t = config.model, config_lib.seq_len(config)
  chunks = model_lib.cache_chunks(t)
  size = t // chunks
  weights = (m.n_layer * (4 + 2 * m.mlp_ratio) * m.d_model ** 2 + m.d_model * config.palette.size) * param_itemsize
  # Position p reads (p // size + 1) chunks of `size`: summed over positions, size² · chunks(chunks + 1) / 2.
  cache = 2 * m.n_layer * images * m.d_model * cache_itemsize * size * size * chunks * (chunks + 1) // 2
  return t * weights + cache


def logits_gap(config, s, params, hf, mesh) -> float:
  """Max |logit difference| of the two models on one teacher-forced batch: they are the same model."""
  import torch  # pylint: disable=g-import-not-at-top
  tokens = common.random_tokens(config, 1)[0][:2]
  with sharding_lib.activate(mesh):
    ours = np.asarray(s.model.apply({"params": params}, tokens))
  inputs = np.concatenate([np.full((len(tokens), 1), config.palette.size), tokens[:, :-1]], axis=1)
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(inputs).long()).logits.numpy()
  return float(np.abs(ours - theirs).max())


def measure(config, images: list[int], rounds: int, transformers_max: int) -> dict:
  s, state, mesh = common.pixelgpt_setup(config)
  params = common.perturbed(state.params)
  hf = common.hf_model(config, params).eval()
  import torch  # pylint: disable=g-import-not-at-top
  length = config_lib.seq_len(config)
  sos = config.palette.size  # transformers' ImageGPT holds the start-of-sequence as the last token id
  times = {}
  for n in images:
    prefix = jax.device_put(np.zeros((n, length), np.int32), s.batch_sharding["tokens"])
    with sharding_lib.activate(mesh):
      compiled = s.sample.lower(params, jax.random.key(0), prefix).compile()
    calls = {"seed": 0}

    def ours(compiled=compiled, prefix=prefix):
      calls["seed"] += 1
      jax.block_until_ready(compiled(params, jax.random.key(calls["seed"]), prefix))

    def theirs(n=n):
      with torch.no_grad():
        out = hf.generate(input_ids=torch.full((n, 1), sos), attention_mask=torch.ones((n, 1), dtype=torch.long),
                          max_length=length + 1, do_sample=True, top_k=0, temperature=1.0, use_cache=True,
                          pad_token_id=sos)
      assert out.shape == (n, length + 1), out.shape

    # One untimed call of each side first at the smallest size only: it warms both code paths, and a call at 64
    # images takes minutes.
    sides = {f"pixelgpt/{n}": ours, **({f"transformers/{n}": theirs} if n <= transformers_max else {})}
    times.update(common.interleaved(sides, rounds, warmup=int(n == min(images))))
  result = {"logits_max_abs_diff": logits_gap(config, s, params, hf, mesh), "sizes": {}}
  for n in images:
    row = {"decode_gb": decode_bytes(config, n) / 1e9}
    for side in ("pixelgpt", "transformers"):
      if f"{side}/{n}" in times:
        seconds = times[f"{side}/{n}"]
        row[side] = {"seconds": common.median(seconds), "samples_per_sec": n / common.median(seconds),
                     "all_seconds": seconds}
    if "transformers" in row:
      row["ratio"] = row["pixelgpt"]["samples_per_sec"] / row["transformers"]["samples_per_sec"]
    result["sizes"][str(n)] = row
  return result


def markdown(config, result: dict, machine: dict, command: str, rounds: int) -> str:
  bandwidth = machine["memory"]["xla_read_gb_per_s"]
  m = config.model
  lines = [
      "# Sampling speed: pixelgpt's cached sampler vs transformers' generate",
      "",
      f"`{command}`: {m.n_layer} layers × d {m.d_model} × {m.n_head} heads, {config.dataset.resolution}×"
      f"{config.dataset.resolution} images (T={config.dataset.resolution ** 2} tokens each), K={config.palette.size}, "
      f"float32, temperature 1, top_k 0, key/value cache on both sides. Median of {rounds} calls per cell, the calls "
      f"of both sides interleaved (after one untimed call of each at the smallest size). The two models agree to "
      f"{result['logits_max_abs_diff']:.1e} in logits (same converted weights).",
      f"Machine ({machine['kind']}): {common.describe(machine)}.",
      "",
      f"Roofline: the GB a call must read (every weight once per position, and per image the float32 keys and "
      f"values of the cache chunks each position attends to) over {bandwidth} GB/s, the rate XLA reads memory at "
      f"here; the fraction is that time over the measured one. Small batches can beat it: their cache partly fits "
      f"the CPU's caches.",
      "",
      "| images per call | pixelgpt (s) | pixelgpt samples/s | ms per image | must read (GB) | of the roofline "
      "| transformers (s) | transformers samples/s | ratio |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for n, row in result["sizes"].items():
    p, t = row["pixelgpt"], row.get("transformers")
    theirs = (f"{t['seconds']:.2f} | {t['samples_per_sec']:.2f} | **{row['ratio']:.1f}×**" if t else
              "not timed | — | —")
    lines.append(f"| {n} | {p['seconds']:.2f} | {p['samples_per_sec']:.2f} | {1e3 * p['seconds'] / int(n):.0f} | "
                 f"{row['decode_gb']:.0f} | {100 * row['decode_gb'] / bandwidth / p['seconds']:.0f}% | {theirs} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = common.shape_config(FLAGS.shape, use_bias=True)
  machine = common.machine(measure=True)
  result = measure(config, [int(n) for n in FLAGS.images], FLAGS.rounds, FLAGS.transformers_max_images)
  machine["load_average_1m_after"] = round(common.load_average(), 2)
  command = ("python benchmarks/sample_speed.py " + " ".join(
      f"--{name}={FLAGS[name].serialize().split('=', 1)[1]}" for name in ("shape", "images", "rounds")
      if FLAGS[name].present)).strip()
  name = f"{FLAGS.out}.{machine['kind']}"  # one results file per machine kind
  text = markdown(config, result, machine, command, FLAGS.rounds)
  print(text)
  if FLAGS.out:
    print("->", common.write(name, {"command": command, "machine": machine, "config": config.to_dict(), **result},
                             text))


if __name__ == "__main__":
  app.run(main)
