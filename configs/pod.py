"""iGPT-L and iGPT-XL pretraining on TPU pods: one config for every model × topology, `configs/pod.py:MODEL,TOPOLOGY`.

MODEL     l (iGPT-L, 1.4B parameters, at 32×32 = 1024 tokens), l48 (iGPT-L at 48×48 = 2304 tokens),
          xl (iGPT-XL, 6.8B parameters, at 64×64 = 4096 tokens).
TOPOLOGY  a Cloud TPU accelerator type, `xN` for N slices joined over the data-center network:
          v3-2048, v4-2048, v5p-2048, v5e-256x8 (the table's), or any other size of these generations.

Prove it on this machine (libtpu compiles the trainer's own train step for the pod; no TPU needed), then launch:

  pixelgpt compile --config configs/pod.py:xl,v5p-2048 --topology v5p-2048
  python launch/tpu.py up --name igpt-xl --zone ZONE --accelerator-type v5p-2048 \
    --config configs/pod.py:xl,v5p-2048 --workdir gs://BUCKET/igpt_xl --config.dataset.data_dir=gs://BUCKET/tfds

  pixelgpt compile --config configs/pod.py:l,v5e-256x8 --topology v5e-256 --num_slices 8
  python launch/tpu.py up --name igpt-l --zone ZONE --accelerator-type v5litepod-256 --slices 8 \
    --config configs/pod.py:l,v5e-256x8 --workdir gs://BUCKET/igpt_l --config.dataset.data_dir=gs://BUCKET/tfds

FSDP within each slice, data parallel across slices, and tensor parallelism (heads, MLP, vocabulary) of 4-8 on
neighbouring chips. Every data-parallel shard takes one sequence, so the global batch is devices / tensor: the
paper's 128 (L) and 64 (XL) cannot split over 1024-2048 devices, and pure FSDP would make it 8-32x the paper's;
tensor parallelism keeps it at 2-8x. The lr stays the family's; the schedule keeps the paper's epochs: warmup for
one epoch, then as many images as 1M steps at the paper's batch.

Every combination's memory per device, fit, step time at a stated MFU and rows each host decodes per step:
benchmarks/results/pod_table.md, written by `python benchmarks/pod_table.py`.
"""

import math
import re

from pixelgpt import compile as compile_lib
from pixelgpt import config as config_lib

MODELS = {"l": ("l", 32), "l48": ("l", 48), "xl": ("xl", 64)}  # name -> (iGPT family size, resolution)
TOPOLOGIES = ("v3-2048", "v4-2048", "v5e-256x8", "v5p-2048")  # the pod table's
COMBINATIONS = tuple(f"{model},{topology}" for model in MODELS for topology in TOPOLOGIES)

# (tensor, remat) by model and libtpu generation name ('v5' is v5p), where a combination needs other than tensor 4
# without remat to fit its HBM (pod_table.md):
# XL's activations at 4096 tokens need remat below v5p's 95 GiB, and v3's 16 GiB also its weights split 8 ways.
PLANS = {("xl", "v3"): (8, "dots_no_batch"), ("xl", "v4"): (4, "dots_no_batch"),
         ("xl", "v5e"): (4, "dots_no_batch")}
DEFAULT_PLAN = (4, "none")


def parse(arg: str) -> tuple[str, compile_lib.Topology]:
  """'xl,v5e-256x8' -> ('xl', the Topology of 8 v5e-256 slices); ValueError naming what is expected."""
  model, _, topology = (arg or "").partition(",")
  match = re.fullmatch(r"(.+?)(?:x(\d+))?", topology.strip())
  if model.strip() not in MODELS or not match:
    raise ValueError(f"configs/pod.py takes MODEL,TOPOLOGY with MODEL one of {', '.join(MODELS)} and TOPOLOGY an "
                     f"accelerator type with xN for N slices (e.g. xl,v5p-2048 or l,v5e-256x8), got {arg!r}")
  return model.strip(), compile_lib.parse_topology(match.group(1), int(match.group(2) or 1))


def get_config(arg: str | None = None):
  model, topology = parse(arg)
  size, resolution = MODELS[model]
  tensor, remat = PLANS.get((model, topology.generation.libtpu_name), DEFAULT_PLAN)

  c = config_lib.igpt(size)
  paper_batch, paper_steps, epoch_images = c.batch_size, c.total_steps, c.optim.warmup_steps * c.batch_size
  c.batch_size = topology.num_devices // tensor
  c.total_steps = paper_steps * paper_batch // c.batch_size
  c.optim.warmup_steps = epoch_images // c.batch_size
  c.dataset.resolution = resolution
  # imagenet_resized comes at 8-64 px; the pipeline BOX-downsamples the next larger size (64 -> 48).
  side = 2 ** math.ceil(math.log2(resolution))
  c.dataset.name = f"tfds:imagenet_resized/{side}x{side}"
  c.model.remat, c.model.attention = remat, "auto"  # on TPU: splash (benchmarks/results/splash_attention.md)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data = 1, -1, tensor, topology.num_slices
  return c
