"""Autoregressive sampling of palette tokens, completions of images, and PNG grids a person can look at.

`sample` decodes one position per step of a compiled `lax.fori_loop` with a preallocated key/value cache;
`sample_naive` recomputes the whole prefix at every position and is the reference the cached sampler must match.
Both draw row r's token at position t with the key fold_in(fold_in(rng, t), r), so the same key gives the same images.
"""

import dataclasses
import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import palette as palette_lib
from pixelgpt import storage


def _pick(rng, logits, t, rows, temperature: float, top_k: int):
  """Position t's tokens [N] from logits [N, K]; row r draws with the key fold_in(fold_in(rng, t), rows[r]), so a
  row's image does not depend on which other rows are decoded with it."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(rng, t), rows)
  return jax.vmap(jax.random.categorical)(keys, logits)


def sample(model, params, rng, prefix, *, keep: int = 0, temperature: float = 1.0, top_k: int = 0):
  """prefix [N, T] int32 -> tokens [N, T]: positions < keep are copied from prefix, the rest are sampled."""
  n, length = prefix.shape
  if model.cfg.scan_layers:
    # Under the layer scan every position sliced each layer's cache out of the stacked cache and wrote it back:
    # copies of the whole cache per token (measured 2.5× slower). Unrolled, each layer's cache is its own buffer
    # carried by the loop and updated in place.
    params = model_lib.unstack_layers(params, model.cfg.n_layer)
    model = model_lib.Transformer(dataclasses.replace(model.cfg, scan_layers=False))
  rows = jnp.arange(n)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), prefix[:, :1], decode_position=0))
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables["cache"])

  def body(t, carry, chunk):
    tokens, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(t - 1, 0), 1, axis=1)
    logits, updated = model.apply({"params": params, "cache": cache}, previous, decode_position=t,
                                  decode_chunk=chunk, mutable=["cache"])
    drawn = _pick(rng, logits[:, 0], t, rows, temperature, top_k).astype(tokens.dtype)
    column = jnp.where(t < keep, jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), drawn[:, None])
    return jax.lax.dynamic_update_slice_in_dim(tokens, column, t, axis=1), updated["cache"]

  # One loop per cache chunk: the chunk a position writes, and how many it reads, must be static.
  size = length // model_lib.cache_chunks(length)
  carry = (prefix, cache)
  for chunk in range(length // size):
    carry = jax.lax.fori_loop(chunk * size, (chunk + 1) * size, functools.partial(body, chunk=chunk), carry)
  return carry[0]


def sample_naive(model, params, rng, prefix, *, keep: int = 0, temperature: float = 1.0, top_k: int = 0):
  """The same distribution as `sample`, recomputing all T positions for each new token (O(T²) work)."""
  rows = jnp.arange(prefix.shape[0])

  def body(t, tokens):
    logits = model.apply({"params": params}, tokens)[:, t]
    return tokens.at[:, t].set(_pick(rng, logits, t, rows, temperature, top_k).astype(tokens.dtype))

  return jax.lax.fori_loop(keep, prefix.shape[1], body, prefix)


def tokens_to_images(tokens: np.ndarray, palette: np.ndarray, resolution: int) -> np.ndarray:
  """[N, T] tokens -> [N, H, W, C] uint8 through the palette."""
  pixels = palette_lib.dequantize(np.asarray(tokens), palette)
  return palette_lib.to_uint8(pixels.reshape(len(tokens), resolution, resolution, palette.shape[1]))


def tile(images: np.ndarray, *, columns: int, min_size: int = 256) -> np.ndarray:
  """Tiles [N, H, W, C] uint8 images with 1-pixel gaps into one [H', W', C] grid, upscaled (nearest) so it is
  >= min_size wide."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  scale = max(1, -(-min_size // grid.shape[1]))
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def save_grid(images: np.ndarray, path, *, columns: int, min_size: int = 256) -> np.ndarray:
  """Writes tile(images) as a PNG at `path` and returns the grid (for TensorBoard)."""
  grid = tile(images, columns=columns, min_size=min_size)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  storage.write_png(storage.path(path), lambda f: image.save(f, format="PNG"))
  return grid


# ----------------------------------------------------------------------------------------------------------------
# `pixelgpt sample`
# ----------------------------------------------------------------------------------------------------------------
def sample_flags(fv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  cli.define_read_flags(fv)  # --config.dataset.* picks the held-out images that --complete completes
  flags.DEFINE_string("out", None, "PNG grid to write (default W/samples/sample_<step>.png).", flag_values=fv)
  flags.DEFINE_integer("num", 16, "Images to sample (with --complete: held-out images to complete).",
                       flag_values=fv)
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0: greedy).", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest colours only (0: all).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_bool("complete", False, "Complete held-out images from their first --keep_rows rows.",
                    flag_values=fv)
  flags.DEFINE_integer("keep_rows", 0, "Rows of each held-out image kept with --complete.", flag_values=fv)
  flags.DEFINE_integer("completions", 4, "Completions per held-out image with --complete.", flag_values=fv)


def sample_main(fv):
  import time  # pylint: disable=g-import-not-at-top
  from pixelgpt import cli, sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top
  from pixelgpt.data import pipeline  # pylint: disable=g-import-not-at-top
  from pixelgpt.errors import UserError  # pylint: disable=g-import-not-at-top
  run = cli.open_workdir(fv)
  config, res = run.config, run.config.dataset.resolution
  if not run.setup.model.cfg.causal:
    raise UserError("sampling needs a model trained with model.objective='ar'")
  if fv.num <= 0 or fv.temperature < 0 or fv.top_k < 0 or fv.top_k > config.palette.size:
    raise UserError("--num must be > 0, --temperature >= 0 and 0 <= --top_k <= palette size")
  if fv.complete:
    if not 0 < fv.keep_rows < res:
      raise UserError(f"--keep_rows must be between 1 and {res - 1} for {res}x{res} images")
    originals = np.concatenate([b["tokens"][b["mask"] > 0] for b in pipeline.make_eval_batches(
        config_lib.override(config, {"dataset.eval_examples": fv.num}), run.palette)])
    prefix = np.repeat(originals, fv.completions, axis=0)
    keep = fv.keep_rows * res
  else:
    prefix, keep = np.zeros((fv.num, res * res), np.int32), 0
  # Pad to a multiple of the devices so the batch shards evenly; padding rows are dropped after sampling.
  devices = run.mesh.devices.size
  padded = -(-len(prefix) // devices) * devices
  batch = np.concatenate([prefix, np.zeros((padded - len(prefix), prefix.shape[1]), np.int32)])
  with sharding_lib.activate(run.mesh):
    fn = jax.jit(lambda p, r, x: sample(run.setup.model, p, r, x, keep=keep, temperature=fv.temperature,
                                        top_k=fv.top_k))
    layout = run.setup.batch_sharding["tokens"]
    x = pipeline.to_global({"tokens": batch[sharding_lib.local_rows(layout, padded)]}, layout, padded)["tokens"]
    compiled = fn.lower(run.params, jax.random.key(fv.seed), x).compile()
    start = time.perf_counter()
    tokens = jax.block_until_ready(compiled(run.params, jax.random.key(fv.seed), x))
    seconds = time.perf_counter() - start
    # Every process sampled its rows; all take part in the gather, process 0 writes the grid.
    tokens = multihost_utils.process_allgather(tokens, tiled=True)[:len(prefix)]
  if jax.process_index() != 0:
    return
  images = tokens_to_images(tokens, run.palette, res)
  if fv.complete:
    # Each grid row: the kept rows alone, the completions, then the original image.
    half = tokens_to_images(np.where(np.arange(res * res) < keep, originals, 0), run.palette, res)
    half[:, fv.keep_rows:] = 255 // 2
    rows = [np.concatenate([half[i:i + 1], images[i * fv.completions:(i + 1) * fv.completions],
                            tokens_to_images(originals[i:i + 1], run.palette, res)]) for i in range(len(originals))]
    images, columns = np.concatenate(rows), fv.completions + 2
  else:
    columns = int(np.ceil(np.sqrt(len(images))))
  kind = "completion" if fv.complete else "sample"
  out = (storage.path(fv.out) if fv.out else
         storage.path(fv.workdir) / "samples" / f"{kind}_step{run.step:06d}_seed{fv.seed}.png")
  grid = save_grid(images, out, columns=columns)
  metrics_lib.add_to_tensorboard(fv.workdir, run.step, kind, images={f"{kind}s/seed_{fv.seed}": grid})
  print(f"pixelgpt sample: {len(tokens)} {kind}s of {res}x{res} in {seconds:.2f}s = "
        f"{len(tokens) / seconds:.1f} samples/s (compiled once, key/value cache) -> {out}")

