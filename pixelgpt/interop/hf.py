"""Hugging Face transformers ImageGPT <-> pixelgpt workdir: exact conversion of weights, palette and shapes.

`pixelgpt convert --from_hf DIR_OR_HUB_ID --workdir W` writes a workdir every command reads (and `train` continues);
`pixelgpt convert --to_hf DIR --workdir W` writes what `ImageGPTForCausalImageModeling.from_pretrained(DIR)` loads.
"""

import dataclasses
import json
import math
import os

from absl import flags
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from pixelgpt import config as config_lib
from pixelgpt import model as model_lib
from pixelgpt import storage
from pixelgpt import train
from pixelgpt import workdir as workdir_lib
from pixelgpt.errors import UserError

# One layer's tensors: HF's name under `transformer.h.{i}.`, pixelgpt's paths under `block_{i}/`, HF's shape for
# width d and MLP width f. HF weights are [in, out] (Conv1D) and c_attn holds query, key, value side by side, so
# each pixelgpt tensor is one equal slice of the HF tensor's last axis, reshaped (heads split out of d).
_LAYER = (
    ("ln_1.weight", ("ln_1/scale",), lambda d, f: (d,)),
    ("attn.c_attn.weight", ("attn/query/kernel", "attn/key/kernel", "attn/value/kernel"), lambda d, f: (d, 3 * d)),
    ("attn.c_attn.bias", ("attn/query/bias", "attn/key/bias", "attn/value/bias"), lambda d, f: (3 * d,)),
    ("attn.c_proj.weight", ("attn/out/kernel",), lambda d, f: (d, d)),
    ("attn.c_proj.bias", ("attn/out/bias",), lambda d, f: (d,)),
    ("ln_2.weight", ("ln_2/scale",), lambda d, f: (d,)),
    ("mlp.c_fc.weight", ("mlp/fc/kernel",), lambda d, f: (d, f)),
    ("mlp.c_fc.bias", ("mlp/fc/bias",), lambda d, f: (f,)),
    ("mlp.c_proj.weight", ("mlp/proj/kernel",), lambda d, f: (f, d)),
    ("mlp.c_proj.bias", ("mlp/proj/bias",), lambda d, f: (d,)),
)

# ImageGPT options with one value pixelgpt's model computes exactly. reorder_and_upcast_attn is accepted: it only
# changes where float16 attention is upcast, and pixelgpt's attention scores are float32 anyway.
_EXACT = (("activation_function", "quick_gelu"), ("scale_attn_weights", True),
          ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
          ("layer_norm_epsilon", model_lib.NORM_EPS))

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first
_FIXED_BY_CHECKPOINT = (set(train.SHAPE_KEYS) - {"model.scan_layers", "model.use_bias"}) | {"model.objective"}
_TFDS_SIDES = (8, 16, 32, 64)  # the resolutions tfds imagenet_resized is published at


# ----------------------------------------------------------------------------------------------------------------
# Shapes and the tensor mapping (both directions read the one table above).
# ----------------------------------------------------------------------------------------------------------------
def _mlp_width(hf) -> int:
  return hf.n_inner or 4 * hf.n_embd


def _hf_shapes(hf) -> dict[str, tuple]:
  d, f, k = hf.n_embd, _mlp_width(hf), hf.vocab_size - 1
  shapes = {"transformer.wte.weight": (k + 1, d), "transformer.wpe.weight": (hf.n_positions, d),
            "transformer.ln_f.weight": (d,), "lm_head.weight": (k, d)}
  for i in range(hf.n_layer):
    shapes.update({f"transformer.h.{i}.{name}": shape(d, f) for name, _, shape in _LAYER})
  return shapes


def _param_shapes(config) -> dict[str, tuple]:
  """pixelgpt's parameter shapes by '/'-joined path with unstacked layers (block_{i}/...), from the model itself."""
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(config), scan_layers=False)
  tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
  params = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), tokens)["params"]
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(params), sep="/").items()}


def _params_from_state(state: dict, hf, shapes: dict) -> dict[str, np.ndarray]:
  """HF state dict -> flat pixelgpt params of `shapes`; biases the model lacks are dropped (they are all zero)."""
  k = hf.vocab_size - 1
  wte = state["transformer.wte.weight"]
  flat = {"wte": wte[:k], "sos": wte[k], "wpe": state["transformer.wpe.weight"],
          "ln_f/scale": state["transformer.ln_f.weight"], "head/kernel": state["lm_head.weight"].T}
  for i in range(hf.n_layer):
    for name, paths, _ in _LAYER:
      for path, part in zip(paths, np.split(state[f"transformer.h.{i}.{name}"], len(paths), axis=-1)):
        flat[f"block_{i}/{path}"] = part
  if "head/bias" in shapes:  # HF's lm_head has no bias
    flat["head/bias"] = np.zeros(shapes["head/bias"], np.float32)
  return {path: np.ascontiguousarray(flat[path].reshape(shape), np.float32) for path, shape in shapes.items()}


def _state_from_params(flat: dict, hf) -> dict[str, np.ndarray]:
  """Flat pixelgpt params with unstacked layers -> HF state dict; a model without biases gets zero biases."""
  head_bias = flat.get("head/bias")
  if head_bias is not None and np.any(head_bias != 0):
    raise UserError("the head has a nonzero bias, which transformers' ImageGPT lm_head cannot hold")
  shapes = _hf_shapes(hf)
  state = {"transformer.wte.weight": np.concatenate([flat["wte"], flat["sos"][None]]),
           "transformer.wpe.weight": flat["wpe"], "transformer.ln_f.weight": flat["ln_f/scale"],
           "lm_head.weight": flat["head/kernel"].T}
  for i in range(hf.n_layer):
    for name, paths, _ in _LAYER:
      key = f"transformer.h.{i}.{name}"
      part_shape = shapes[key][:-1] + (shapes[key][-1] // len(paths),)
      parts = [flat[f"block_{i}/{p}"].reshape(part_shape) if f"block_{i}/{p}" in flat
               else np.zeros(part_shape, np.float32) for p in paths]
      state[key] = np.concatenate(parts, axis=-1)
  return {key: np.ascontiguousarray(value, np.float32) for key, value in state.items()}


def _stack_layers(flat: dict, n_layer: int) -> dict:
  """block_{i}/p -> blocks/p with a leading layer axis: the layout of scanned layers."""
  out = {path: value for path, value in flat.items() if not path.startswith("block_")}
  for path in [p.split("/", 1)[1] for p in flat if p.startswith("block_0/")]:
    out[f"blocks/{path}"] = np.stack([flat[f"block_{i}/{path}"] for i in range(n_layer)])
  return out


def _unstack_layers(flat: dict, n_layer: int) -> dict:
  unstacked = model_lib.unstack_layers(traverse_util.unflatten_dict(flat, sep="/"), n_layer)
  return traverse_util.flatten_dict(unstacked, sep="/")


# ----------------------------------------------------------------------------------------------------------------
# Configs: ImageGPTConfig <-> pixelgpt config.
# ----------------------------------------------------------------------------------------------------------------
def _check_representable(hf, where: str) -> int:
  """Raises UserError for what pixelgpt cannot compute exactly; returns the image side (n_positions = side²)."""
  for key, value in _EXACT:
    if getattr(hf, key) != value:
      raise UserError(f"{where}: {key}={getattr(hf, key)!r} has no exact pixelgpt equivalent (needs {value!r})")
  side = math.isqrt(hf.n_positions)
  if side * side != hf.n_positions:
    raise UserError(f"{where}: n_positions={hf.n_positions} is not the square of an image side")
  if _mlp_width(hf) % hf.n_embd:
    raise UserError(f"{where}: n_inner={hf.n_inner} is not a multiple of n_embd={hf.n_embd}")
  if hf.vocab_size < 2 or hf.n_embd % hf.n_head:
    raise UserError(f"{where}: needs vocab_size >= 2 and n_embd divisible by n_head")
  return side


def _pixelgpt_config(hf, side: int, channels: int, has_bias: bool, overrides: dict):
  """The released iGPT sizes get their training config (configs/igpt_*.py), so `pixelgpt train` with that file
  continues pretraining; other shapes get base() with ImageNet (RGB) or the embedded digits (grey) as data."""
  shape = (hf.n_layer, hf.n_embd, hf.n_head, side)
  family = [s for s, f in config_lib.IGPT_FAMILY.items()
            if (f["n_layer"], f["d_model"], f["n_head"], f["resolution"]) == shape]
  c = config_lib.igpt(family[0]) if family else config_lib.base()
  if not family and channels == 3:
    tfds_side = next((s for s in _TFDS_SIDES if s >= side), _TFDS_SIDES[-1])
    c.dataset.name = f"tfds:imagenet_resized/{tfds_side}x{tfds_side}"
    c.dataset.eval_split = "validation"
  c.dataset.resolution, c.dataset.channels = side, channels
  c.palette.size, c.palette.path = hf.vocab_size - 1, ""
  c.model.n_layer, c.model.d_model, c.model.n_head = hf.n_layer, hf.n_embd, hf.n_head
  c.model.mlp_ratio = _mlp_width(hf) // hf.n_embd
  # Zero biases (OpenAI's released weights) are exactly no biases: the converted model is then the paper's, with
  # the parameter tree of a pixelgpt-trained one, so `train --config configs/igpt_s.py` resumes it as is.
  c.model.use_bias = has_bias
  # float32 compute reproduces transformers' logits; dtype fixes no shape, so a train config may still use bf16.
  c.model.dtype = "float32"
  for key in overrides:
    if key in _FIXED_BY_CHECKPOINT:
      raise UserError(f"--config.{key} is fixed by the checkpoint and cannot be overridden")
  c = config_lib.override(c, overrides)
  if has_bias and not c.model.use_bias:
    raise UserError("--config.model.use_bias=False would drop the checkpoint's nonzero biases")
  config_lib.validate(c)
  return c


def _hf_config(config):
  import transformers  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.objective != "ar":
    raise UserError(f"transformers' ImageGPT is autoregressive; this workdir's objective is {m.objective!r}")
  # pixelgpt trains without dropout (as the paper), so the exported model is configured the same way.
  return transformers.ImageGPTConfig(
      vocab_size=config.palette.size + 1, n_positions=config_lib.seq_len(config), n_embd=m.d_model,
      n_layer=m.n_layer, n_head=m.n_head, n_inner=None if m.mlp_ratio == 4 else m.mlp_ratio * m.d_model,
      activation_function="quick_gelu", layer_norm_epsilon=model_lib.NORM_EPS, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, tie_word_embeddings=False, architectures=["ImageGPTForCausalImageModeling"])


# ----------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face model directory.
# ----------------------------------------------------------------------------------------------------------------
def _local_dir(src: str) -> str:
  """src itself if it is a directory, else a hub id downloaded (weights in one format only) to the HF cache."""
  if os.path.isdir(src):
    return src
  if os.path.exists(src) or src.startswith((".", "/", "~")) or src.count("/") != 1:
    raise UserError(f"{src} is not a model directory or a Hugging Face hub id (owner/name)")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    path = huggingface_hub.snapshot_download(src, allow_patterns=["*.json", "*.safetensors"])
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
      path = huggingface_hub.snapshot_download(src, allow_patterns=["*.json", "*.bin"])
  except Exception as e:  # pylint: disable=broad-except  # network, auth, missing repo: all one line for the user
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{src}: not a local directory and not downloadable from the hub ({first})") from None
  return path


def _read_json(src: str, name: str) -> dict:
  path = os.path.join(src, name)
  if not os.path.exists(path):
    raise UserError(f"{src} has no {name}")
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None


def _read_hf_config(src: str):
  import transformers  # pylint: disable=g-import-not-at-top
  raw = _read_json(src, "config.json")
  if raw.get("model_type") != "imagegpt":
    raise UserError(f"{src}/config.json is not an ImageGPT config (model_type={raw.get('model_type')!r})")
  try:
    return transformers.ImageGPTConfig.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise UserError(f"{src}/config.json: {e}") from None


def _read_palette(src: str, k: int) -> np.ndarray:
  """preprocessor_config.json's `clusters` (read directly: transformers' processor class needs torchvision)."""
  where = f"{src}/preprocessor_config.json"
  clusters = _read_json(src, "preprocessor_config.json").get("clusters")
  if clusters is None:
    raise UserError(f"{where} has no clusters (the colour palette)")
  try:
    palette = np.asarray(clusters, np.float32)
  except (TypeError, ValueError):
    raise UserError(f"{where}: clusters is not a [K, C] array of numbers") from None
  if palette.ndim != 2 or palette.shape[0] != k or palette.shape[1] not in (1, 3):
    raise UserError(f"{where}: clusters has shape {palette.shape}, expected [{k}, 3] or [{k}, 1] "
                    f"(vocab_size - 1 = {k} colours)")
  if not (np.all(np.isfinite(palette)) and np.abs(palette).max() <= 1.0):
    raise UserError(f"{where}: clusters must lie in [-1, 1]")
  return palette


def _weight_paths(src: str) -> list[str]:
  for name in _WEIGHT_FILES:
    index = os.path.join(src, f"{name}.index.json")
    if os.path.exists(index):  # a checkpoint sharded over several files
      shards = sorted(set(_read_json(src, f"{name}.index.json").get("weight_map", {}).values()))
      return [os.path.join(src, shard) for shard in shards]
    if os.path.exists(os.path.join(src, name)):
      return [os.path.join(src, name)]
  raise UserError(f"{src} has no weights ({' or '.join(_WEIGHT_FILES)})")


def _load_weights(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    loaded = load_file(path)  # bfloat16 reads as ml_dtypes.bfloat16, which JAX registers with numpy
  else:
    import torch  # pylint: disable=g-import-not-at-top
    loaded = {name: t.to(torch.float32).numpy() for name, t in
              torch.load(path, map_location="cpu", weights_only=True).items()}
  return {name: np.asarray(value, np.float32) for name, value in loaded.items()}


def _read_state(src: str, hf) -> dict[str, np.ndarray]:
  """The checkpoint's tensors by their ImageGPTForCausalImageModeling names, shapes checked against `hf`."""
  state = {}
  for path in _weight_paths(src):
    if not os.path.exists(path):
      raise UserError(f"{path} is missing (named by the checkpoint's index)")
    state.update(_load_weights(path))
  # An ImageGPTModel checkpoint names tensors without the `transformer.` prefix (and has no lm_head).
  state = {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": value
           for name, value in state.items()}
  for name, shape in _hf_shapes(hf).items():
    if name not in state:
      raise UserError(f"{src}: the checkpoint has no {name}" +
                      (" (a model without the causal image-modeling head?)" if name == "lm_head.weight" else ""))
    if state[name].shape != shape:
      raise UserError(f"{src}: {name} has shape {state[name].shape}, but config.json implies {shape}")
  return state  # unknown extras, e.g. the causal-mask buffers older checkpoints saved, are ignored


# ----------------------------------------------------------------------------------------------------------------
# The two directions.
# ----------------------------------------------------------------------------------------------------------------
def from_hf(src: str, workdir: str, overrides: dict | None = None) -> None:
  """Converts an ImageGPT model (a directory or a hub id) into a new pixelgpt workdir.

  Args:
    src: a directory with config.json, preprocessor_config.json and model.safetensors or pytorch_model.bin
      (possibly sharded with an index), or a hub id such as openai/imagegpt-small.
    workdir: where to write config.json, palette.npy and checkpoint 0 (must hold no checkpoints yet).
    overrides: {'dataset.name': ..., ...} applied to the derived config; keys that fix shapes are refused.
  """
  src = _local_dir(src)
  hf = _read_hf_config(src)
  side = _check_representable(hf, f"{src}/config.json")
  palette = _read_palette(src, hf.vocab_size - 1)
  state = _read_state(src, hf)
  has_bias = any(np.any(state[name] != 0) for name in _hf_shapes(hf) if name.endswith(".bias"))
  config = _pixelgpt_config(hf, side, palette.shape[1], has_bias, dict(overrides or {}))
  flat = _params_from_state(state, hf, _param_shapes(config))
  if config.model.scan_layers:
    flat = _stack_layers(flat, hf.n_layer)
  workdir_lib.create(workdir, config, traverse_util.unflatten_dict(flat, sep="/"), palette)


def hf_state(config, params) -> tuple:
  """pixelgpt params of `config` -> (transformers' ImageGPTConfig, its state dict as float32 numpy arrays)."""
  hf = _hf_config(config)
  flat = {path: np.asarray(value, np.float32)
          for path, value in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}
  if config.model.scan_layers:
    flat = _unstack_layers(flat, hf.n_layer)
  return hf, _state_from_params(flat, hf)


def to_hf(dst, workdir) -> None:
  """Writes a workdir's latest weights as dst/{config.json, model.safetensors, preprocessor_config.json}; either
  may be local or on a bucket (gs://)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  run = workdir_lib.open_run(workdir)
  hf, state = hf_state(run.config, run.params)
  dst = storage.usable(dst, what="--to_hf")
  storage.write_atomic(dst / "config.json", hf.to_json_string())
  storage.write_atomic(dst / "model.safetensors", save(state, metadata={"format": "pt"}))
  side = run.config.dataset.resolution
  preprocessor = {"image_processor_type": "ImageGPTImageProcessor", "clusters": run.palette.tolist(),
                  "do_color_quantize": True, "do_normalize": True, "do_resize": True, "resample": 2,
                  "size": {"height": side, "width": side}}
  storage.write_atomic(dst / "preprocessor_config.json", json.dumps(preprocessor))


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt convert`
# ----------------------------------------------------------------------------------------------------------------
def define_flags(fv):
  flags.DEFINE_string("from_hf", None, "ImageGPT model directory or hub id (openai/imagegpt-small) to read.",
                      flag_values=fv)
  flags.DEFINE_string("to_hf", None, "Directory to write the workdir's model to, for from_pretrained.",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "The pixelgpt workdir: written by --from_hf, read by --to_hf.",
                      flag_values=fv)
  config_flags.DEFINE_config_dict(
      "config", config_lib.base(), "With --from_hf: --config.a.b=v sets a key of the new workdir's config "
      "(dataset, batch, optimizer; not the shapes, which the checkpoint fixes).", flag_values=fv, lock_config=True)


def main(fv):
  if (fv.from_hf is None) == (fv.to_hf is None):
    raise UserError("give exactly one of --from_hf DIR_OR_HUB_ID and --to_hf DIR")
  overrides = config_flags.get_override_values(fv["config"])  # only the keys given on the command line
  if fv.from_hf is not None:
    from_hf(fv.from_hf, fv.workdir, overrides)
    print(f"pixelgpt: converted {fv.from_hf} -> {fv.workdir}")
  else:
    if overrides:
      raise UserError("--config.* applies only to --from_hf")
    to_hf(fv.to_hf, fv.workdir)
    print(f"pixelgpt: converted {fv.workdir} -> {fv.to_hf}")
