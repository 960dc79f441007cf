"""The one base config (every public key with its default), validation, and derived fields.

Config files in configs/ start from `base()` and override; `validate` is the single place where a user's
config is checked, so that every mistake is one clear line (UserError) before any work starts.
"""

import json
import math

import ml_collections

from pixelgpt.errors import UserError

OBJECTIVES = ("ar", "bert")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "xla", "einsum", "blockwise", "cudnn", "splash")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global, across all devices and processes
  c.total_steps = 1000
  c.log_every = 10
  c.eval_every = 200
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.sample_every = 0  # 0: only at the end of training
  # A JAX profiler trace of profile_steps train steps into W/profile (`pixelgpt profile` summarises it), from
  # profile_start_step (0: the session's second step, once the first has warmed up).
  c.profile_steps = 0
  c.profile_start_step = 0
  c.profile_all_hosts = False  # every process traces its own host (default: process 0 only)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"
  c.dataset.resolution = 8
  c.dataset.channels = 1
  c.dataset.data_dir = ""
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.flip = False  # random horizontal flips of training images
  c.dataset.eval_examples = 0  # 0: the whole eval split
  c.dataset.worker_count = 0  # grain worker processes; 0 decodes in the training process
  c.dataset.skip_unreadable = True  # folder: datasets skip (and count) image files PIL cannot read

  c.palette = ml_collections.ConfigDict()
  c.palette.size = 16
  c.palette.path = ""  # an existing .npy [K, C]; empty: fit k-means on the training split
  c.palette.fit_pixels = 100_000

  c.model = ml_collections.ConfigDict()
  c.model.n_layer = 4
  c.model.d_model = 128
  c.model.n_head = 4
  c.model.mlp_ratio = 4
  c.model.objective = "ar"
  c.model.bert_mask_prob = 0.15
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = "none"
  c.model.scan_layers = True
  c.model.attention = "auto"
  c.model.use_bias = False  # biases in every linear layer (Hugging Face ImageGPT checkpoints have them)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0  # global norm; 0 disables
  c.optim.skip_nonfinite = False  # skip updates with a non-finite loss or gradient instead of stopping

  # Few-shot linear evaluation at eval steps (fewshot.py): off while `layers` is empty.
  c.fewshot = ml_collections.ConfigDict()
  c.fewshot.layers = ()  # e.g. (1, -1): layer l is the mean of ln_1(h_l), n_layer (or -1) the final ln_f
  c.fewshot.shots = (1, 5, 10, 25)  # labelled training images per class
  c.fewshot.eval_examples = 1000  # scored on the first images of the eval split
  c.fewshot.l2 = 1.0  # ridge strength on RMS-scaled features
  c.fewshot.every = 0  # steps between evaluations (a multiple of log_every); 0: at the eval steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all devices not used by the other axes
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # slices, joined over the data-center network
  # How the axes are laid over the devices, outermost first: the innermost one gets neighbouring devices
  # (one host's), so tensor parallelism's per-layer collectives stay on the fastest links.
  c.mesh.axis_order = "data,fsdp,tensor"
  return c


def seq_len(config) -> int:
  return config.dataset.resolution ** 2


def _check(ok: bool, message: str):
  if not ok:
    raise UserError(message)


def validate(config) -> None:
  """Raises UserError naming the first impossible value; device-dependent checks live in sharding.py."""
  positive = ["batch_size", "total_steps", "log_every", "keep_checkpoints", "dataset.resolution",
              "palette.size", "palette.fit_pixels", "model.n_layer", "model.d_model", "model.n_head",
              "model.mlp_ratio"]
  for key in positive:
    value = get(config, key)
    _check(isinstance(value, int) and value > 0, f"config.{key} must be a positive integer, got {value!r}")
  for key in ["eval_every", "checkpoint_every", "sample_every", "profile_steps", "profile_start_step",
              "optim.warmup_steps", "dataset.eval_examples",
              "dataset.worker_count"]:
    value = get(config, key)
    _check(isinstance(value, int) and value >= 0, f"config.{key} must be an integer >= 0, got {value!r}")
  # grain seeds its shuffles with unsigned 32-bit integers.
  _check(isinstance(config.seed, int) and 0 <= config.seed < 2 ** 32,
         f"config.seed must be an integer in [0, 2**32), got {config.seed!r}")
  _check(config.dataset.channels in (1, 3), f"config.dataset.channels must be 1 or 3, got {config.dataset.channels!r}")
  _check(config.model.objective in OBJECTIVES,
         f"config.model.objective must be one of {OBJECTIVES}, got {config.model.objective!r}")
  for key in ["model.dtype", "model.param_dtype"]:
    _check(get(config, key) in DTYPES, f"config.{key} must be one of {DTYPES}, got {get(config, key)!r}")
  _check(config.model.remat in REMAT_POLICIES,
         f"config.model.remat must be one of {REMAT_POLICIES}, got {config.model.remat!r}")
  _check(config.model.attention in ATTENTION,
         f"config.model.attention must be one of {ATTENTION}, got {config.model.attention!r}")
  _check(config.model.attention != "splash" or seq_len(config) % 128 == 0,
         f"config.model.attention='splash' needs a sequence of whole 128-token blocks, got {seq_len(config)} tokens")
  _check(config.model.d_model % config.model.n_head == 0,
         f"config.model.d_model ({config.model.d_model}) must be divisible by model.n_head ({config.model.n_head})")
  _check(0.0 < config.model.bert_mask_prob < 1.0,
         f"config.model.bert_mask_prob must be in (0, 1), got {config.model.bert_mask_prob!r}")
  _check(config.optim.lr > 0 and math.isfinite(config.optim.lr), f"config.optim.lr must be > 0, got {config.optim.lr!r}")
  for key in ["optim.b1", "optim.b2"]:
    _check(0.0 <= get(config, key) < 1.0, f"config.{key} must be in [0, 1), got {get(config, key)!r}")
  _check(config.optim.grad_clip >= 0, f"config.optim.grad_clip must be >= 0, got {config.optim.grad_clip!r}")
  _check(config.optim.weight_decay >= 0, f"config.optim.weight_decay must be >= 0, got {config.optim.weight_decay!r}")
  f = config.fewshot
  n = config.model.n_layer
  _check(all(isinstance(l, int) and -(n + 1) <= l <= n for l in f.layers),
         f"config.fewshot.layers must be layers between 0 and model.n_layer={n} (negative: from the end, -1 the "
         f"final ln_f), got {f.layers!r}")
  _check(len(f.shots) > 0 and all(isinstance(k, int) and k > 0 for k in f.shots),
         f"config.fewshot.shots must be positive integers, got {f.shots!r}")
  _check(f.every >= 0 and f.every % config.log_every == 0,
         f"config.fewshot.every must be a multiple of log_every={config.log_every} (or 0), got {f.every!r}")
  _check(f.eval_examples > 0 and f.l2 > 0,
         f"config.fewshot.eval_examples and l2 must be > 0, got {f.eval_examples!r} and {f.l2!r}")
  axes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  _check(all(isinstance(a, int) and (a > 0 or a == -1) for a in axes),
         f"config.mesh axes must be positive or -1, got data={axes[0]} fsdp={axes[1]} tensor={axes[2]}")
  _check(axes.count(-1) <= 1, "config.mesh: at most one of data, fsdp, tensor may be -1")
  _check(isinstance(config.mesh.dcn_data, int) and config.mesh.dcn_data > 0,
         f"config.mesh.dcn_data must be a positive integer, got {config.mesh.dcn_data!r}")


_REQUIRED = object()


def get(config, dotted: str, default=_REQUIRED):
  """config['a.b.c'] by dotted key; `default` when a key is absent (configs written by older versions)."""
  node = config
  for part in dotted.split("."):
    if default is not _REQUIRED and part not in node:
      return default
    node = node[part]
  return node


def flat_keys(config, prefix: str = "") -> list[str]:
  """Every leaf key of `config` in dotted form ('model.n_layer')."""
  keys = []
  for name, value in config.items():
    dotted = f"{prefix}{name}"
    keys += flat_keys(value, dotted + ".") if isinstance(value, ml_collections.ConfigDict) else [dotted]
  return keys


def override(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with {'a.b': value} overrides applied, as `--config.a.b=value` would."""
  config = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A stored config; keys added to pixelgpt after it was written (e.g. a new group) take their defaults."""
  def merge(defaults: dict, stored: dict) -> dict:
    for key, value in stored.items():
      defaults[key] = merge(defaults[key], value) if isinstance(value, dict) and isinstance(
          defaults.get(key), dict) else value
    return defaults
  return ml_collections.ConfigDict(merge(base().to_dict(), json.loads(text)))


# The paper's model family (Chen et al. 2020, Table/Appendix): layers, width, heads, resolution, batch, lr.
# The paper gives lr 0.003 for iGPT-S and only says larger models used lower rates; M/L/XL values are ours.
IGPT_FAMILY = {
    "s": dict(n_layer=24, d_model=512, n_head=8, resolution=32, batch_size=128, lr=3e-3),
    "m": dict(n_layer=36, d_model=1024, n_head=8, resolution=32, batch_size=128, lr=2e-3),
    "l": dict(n_layer=48, d_model=1536, n_head=16, resolution=32, batch_size=128, lr=1e-3),
    # XL: the paper's batch of 64 cannot be split over 2048 devices (only the 24 heads are tensor-parallel, at
    # most 8-way within a host), so the smallest batch that shards over a v3-2048 is 256 = 2048 / 8.
    "xl": dict(n_layer=60, d_model=3072, n_head=24, resolution=64, batch_size=256, lr=5e-4, tensor=8),
}


def igpt(size: str) -> ml_collections.ConfigDict:
  """iGPT-S/M/L/XL on ImageNet (tfds imagenet_resized), 512-colour palette, Adam(0.9, 0.95), no weight decay,
  warmup of one epoch (1.28M images) then cosine to 0, bf16 compute with f32 params, remat of the blocks."""
  f = IGPT_FAMILY[size]
  c = base()
  c.batch_size = f["batch_size"]
  c.total_steps = 1_000_000
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.sample_every = 50_000
  c.dataset.name = f"tfds:imagenet_resized/{f['resolution']}x{f['resolution']}"
  c.dataset.resolution = f["resolution"]
  c.dataset.channels = 3
  c.dataset.eval_split = "validation"
  c.dataset.eval_examples = 10_000
  c.dataset.worker_count = 8
  c.palette.size = 512
  c.palette.fit_pixels = 1_000_000
  c.model.n_layer = f["n_layer"]
  c.model.d_model = f["d_model"]
  c.model.n_head = f["n_head"]
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.tensor = f.get("tensor", 1)
  c.optim.lr = f["lr"]
  c.optim.warmup_steps = 1_281_167 // f["batch_size"]
  return c
