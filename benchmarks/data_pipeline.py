"""Input pipeline throughput: images/s the grain pipeline delivers (decode, resize to 32×32 RGB, quantize to K=512),
against images/s the train step of an igpt_s-shaped model consumes on the same machine.

  JAX_PLATFORMS=cpu python benchmarks/data_pipeline.py

Sources: Fashion-MNIST (70,000 real 28×28 images held in memory: resize, grey -> RGB, quantize), and the same images
written once as PNG files into a `folder:` dataset (adds PNG decoding), each read in process (worker_count 0) and by
grain worker processes. Batches of 128 (igpt_s's batch) from `pipeline.make_train_iterator`, the trainer's iterator.
The palette is 512 seeded random RGB colours: the nearest-colour search costs the same for any 512 colours.
Consumption: the real train step (`train.setup(...).train_step`) of igpt_s (24 layers × d 512 × 8 heads, T=1024,
float32) at a small batch, images/s = batch / step time.
"""

import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

import common  # benchmarks/common.py, next to this script
from pixelgpt import config as config_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import train
from pixelgpt.data import pipeline
from pixelgpt.data import sources

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 20, "Timed batches per pipeline (after 2 warm-up batches).")
flags.DEFINE_list("workers", ["0", "2"], "grain worker processes to measure (0: decode in this process).")
flags.DEFINE_integer("png_images", 2000, "Fashion-MNIST images written as PNG files for the folder: source.")
flags.DEFINE_integer("consumer_batch", 2, "Batch of the igpt_s train step whose consumption is measured.")
flags.DEFINE_integer("consumer_steps", 3, "Timed igpt_s train steps (after one warm-up step).")
flags.DEFINE_string("out", "data_pipeline", "Results name under benchmarks/results/ ('' writes nothing).")

BATCH = 128
GPU_PEAK_FLOPS = metrics_lib.PEAK_FLOPS_PER_DEVICE["NVIDIA H100"]  # bf16 dense
GPU_MFU = 0.45  # the GPU target


def pipeline_config(name: str, data_dir: str = "", workers: int = 0):
  overrides = {"batch_size": BATCH, "dataset.name": name, "dataset.data_dir": data_dir, "dataset.resolution": 32,
               "dataset.channels": 3, "dataset.worker_count": workers, "palette.size": common.PALETTE_SIZE}
  config = config_lib.override(config_lib.base(), overrides)
  config_lib.validate(config)
  return config


def write_png_folder(root: str, n: int) -> str:
  """n Fashion-MNIST training images as 28×28 RGB PNG files under root/<label>/, the layout `folder:` reads."""
  source = sources.get_source(pipeline_config("fashion_mnist").dataset, "train")
  for i in range(n):
    record = source[i]
    directory = os.path.join(root, str(int(record["label"])))
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(np.repeat(record["image"], 3, axis=-1)).save(os.path.join(directory, f"{i:05d}.png"))
  return root


def pipeline_images_per_sec(config, palette, batches: int) -> float:
  iterator = pipeline.make_train_iterator(config, palette)
  for _ in range(2):  # loads the arrays, starts the workers, fills the prefetch buffers
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  assert batch["tokens"].shape == (BATCH, 1024) and batch["tokens"].max() < common.PALETTE_SIZE
  del iterator  # stops grain's worker processes before anything else is timed
  return batches * BATCH / seconds


def consumption(batch_size: int, steps: int) -> dict:
  """images/s the igpt_s train step consumes at `batch_size` on this machine."""
  config = common.shape_config("igpt_s", batch_size=batch_size)
  s, state, mesh = common.pixelgpt_setup(config)
  with sharding_lib.activate(mesh):
    step = s.train_step.lower(state, train.abstract_batch(config, s)).compile()
  batch = pipeline.to_global({"tokens": common.random_tokens(config, 1)[0], "label": np.zeros(batch_size, np.int32)},
                             s.batch_sharding, batch_size)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))

  seconds = common.median(common.interleaved({"step": run}, steps, warmup=1)["step"])
  flops_per_token = metrics_lib.flops_per_token(model_lib.ModelConfig.from_config(config))
  gpu_images_per_sec = GPU_MFU * GPU_PEAK_FLOPS / (flops_per_token * config_lib.seq_len(config))
  return {"batch_size": batch_size, "step_time_s": seconds, "images_per_sec": batch_size / seconds,
          "gpu_projection_images_per_sec": gpu_images_per_sec}


def markdown(result: dict, machine: dict, command: str) -> str:
  c = result["consumption"]
  lines = [
      "# Input pipeline: images/s delivered vs consumed",
      "",
      f"`{command}`: grain pipeline (`pipeline.make_train_iterator`) at 32×32 RGB, K={common.PALETTE_SIZE}, "
      f"batches of {BATCH}; {result['batches']} timed batches each after 2 warm-up batches. Consumption: the igpt_s "
      f"train step (24 × 512 × 8 heads, T=1024, float32) at batch {c['batch_size']} on this CPU, median of "
      f"{FLAGS.consumer_steps} steps: {c['step_time_s']:.1f} s/step = **{c['images_per_sec']:.2f} images/s**.",
      f"Machine: {common.describe(machine)}.",
      "",
      "| source | grain workers | images/s delivered | × the igpt_s train step on this CPU |",
      "|---|---|---|---|",
  ]
  for row in result["pipelines"]:
    lines.append(f"| {row['source']} | {row['workers']} | {row['images_per_sec']:,.0f} | "
                 f"{row['images_per_sec'] / c['images_per_sec']:,.0f}× |")
  lines += ["", f"For scale: the same step at {GPU_MFU:.0%} MFU of an H100's bf16 peak would consume "
            f"{c['gpu_projection_images_per_sec']:,.0f} images/s (metrics.flops_per_token), which a pod feeds with "
            "one pipeline per host and `dataset.worker_count` workers."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  machine = common.machine()
  palette = np.random.default_rng(0).uniform(-1, 1, (common.PALETTE_SIZE, 3)).astype(np.float32)
  folder = write_png_folder(tempfile.mkdtemp(prefix="pixelgpt_pngs_"), FLAGS.png_images)
  rows = []
  try:
    for name in ("fashion_mnist", f"folder:{folder}"):
      for workers in (int(w) for w in FLAGS.workers):
        config = pipeline_config(name, workers=workers)
        label = "Fashion-MNIST (in memory)" if name == "fashion_mnist" else f"{FLAGS.png_images} PNG files (folder:)"
        rows.append({"source": label, "workers": workers,
                     "images_per_sec": pipeline_images_per_sec(config, palette, FLAGS.batches)})
        print(rows[-1], flush=True)
  finally:
    shutil.rmtree(folder)
  result = {"batches": FLAGS.batches, "pipelines": rows,
            "consumption": consumption(FLAGS.consumer_batch, FLAGS.consumer_steps)}
  machine["load_average_1m_after"] = round(common.load_average(), 2)
  command = ("python benchmarks/data_pipeline.py " + " ".join(
      f"--{name}={FLAGS[name].serialize().split('=', 1)[1]}" for name in
      ("batches", "workers", "png_images", "consumer_batch", "consumer_steps") if FLAGS[name].present)).strip()
  text = markdown(result, machine, command)
  print(text)
  if FLAGS.out:
    print("->", common.write(FLAGS.out, {"command": command, "machine": machine, **result}, text))


if __name__ == "__main__":
  app.run(main)
