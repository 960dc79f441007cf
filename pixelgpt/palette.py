"""The colour palette: k-means centres over pixels in [-1, 1] that turn every pixel into one token.

A palette file is a float32 .npy [K, C] (the layout of OpenAI's `kmeans_centers.npy`), sorted by luminance so
that the same pixels and seed always give the same file and token 0 is the darkest colour.
"""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

from pixelgpt import storage
from pixelgpt.errors import UserError

# ITU-R BT.601 luma weights: the canonical sort key of RGB palettes (and what PIL uses for RGB -> L).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_QUANTIZE_CHUNK = 16_384  # pixels per distance matrix: [chunk, K] float32 stays in cache-friendly megabytes
_ASSIGN_CHUNK = 4_096


def to_unit(images_uint8) -> np.ndarray:
  """uint8 0..255 -> float32 in [-1, 1], the scale on which the palette is fitted."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def to_uint8(unit) -> np.ndarray:
  return np.clip(np.rint((np.asarray(unit, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def fit(pixels: np.ndarray, k: int, seed: int, iters: int = 30) -> np.ndarray:
  """k-means++ then `iters` Lloyd steps over pixels [N, C] in [-1, 1]; returns sorted centres [k, C] float32.

  Deterministic for a seed. With fewer distinct pixel values than k (8×8 digits have 17 grey levels) some
  centres repeat; the palette still has exactly k entries so the vocabulary size is the configured one.
  """
  pixels = np.asarray(pixels, np.float32)
  assert pixels.ndim == 2 and len(pixels) > 0, pixels.shape
  centers = _kmeans(jnp.asarray(pixels), jax.random.key(seed), k, iters)
  return _canonical(np.clip(np.asarray(centers), -1.0, 1.0))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _kmeans(x: jax.Array, key: jax.Array, k: int, iters: int) -> jax.Array:
  n = x.shape[0]
  first_key, rest_key = jax.random.split(key)

  def sq_dist_to(center):
    return jnp.sum((x - center) ** 2, axis=-1)

  def add_center(i, carry):
    # D² sampling: a pixel becomes the next centre with probability proportional to its squared distance to
    # the nearest chosen one; when every pixel already sits on a centre, fall back to uniform (duplicates).
    centers, nearest_sq = carry
    total = jnp.sum(nearest_sq)
    probs = jnp.where(total > 0, nearest_sq / jnp.where(total > 0, total, 1.0), 1.0 / n)
    j = jax.random.choice(jax.random.fold_in(rest_key, i), n, p=probs)
    return centers.at[i].set(x[j]), jnp.minimum(nearest_sq, sq_dist_to(x[j]))

  first = x[jax.random.randint(first_key, (), 0, n)]
  init = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
  centers, _ = jax.lax.fori_loop(1, k, add_center, (init, sq_dist_to(first)))

  def lloyd_step(_, centers):
    # As in `quantize`; full precision because TPUs multiply float32 in bfloat16 passes by default.
    center_sq = jnp.sum(centers * centers, axis=1)
    scores = lambda p: center_sq - 2.0 * jnp.dot(p, centers.T, precision=jax.lax.Precision.HIGHEST)
    nearest = jax.lax.map(lambda p: jnp.argmin(scores(p)), x, batch_size=_ASSIGN_CHUNK)
    sums = jax.ops.segment_sum(x, nearest, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), nearest, num_segments=k)
    # An empty cluster keeps its old centre rather than collapsing to the origin.
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

  return jax.lax.fori_loop(0, iters, lloyd_step, centers)


def _canonical(centers: np.ndarray) -> np.ndarray:
  """Sorts by luminance, ties broken by channel values, so the palette file does not depend on init order."""
  luma = centers[:, 0] if centers.shape[1] == 1 else centers @ _LUMA
  order = np.lexsort(tuple(centers.T[::-1]) + (luma,))
  return np.ascontiguousarray(centers[order], np.float32)


def quantize(pixels, centers) -> np.ndarray:
  """Pixels [..., C] in [-1, 1] -> int32 tokens [...]: the index of the nearest centre (squared distance)."""
  pixels = np.asarray(pixels, np.float32)
  centers = np.asarray(centers, np.float32)
  assert pixels.shape[-1] == centers.shape[1], (pixels.shape, centers.shape)
  flat = pixels.reshape(-1, centers.shape[1])
  # ||x - c||² = ||x||² - 2 x·c + ||c||², and ||x||² is the same for every centre, so argmin needs only the rest.
  center_sq = np.sum(centers * centers, axis=1)
  minus_twice = -2.0 * centers.T
  tokens = np.empty(len(flat), np.int32)
  for start in range(0, len(flat), _QUANTIZE_CHUNK):
    scores = flat[start:start + _QUANTIZE_CHUNK] @ minus_twice
    scores += center_sq  # in place: one [chunk, K] buffer instead of three
    tokens[start:start + len(scores)] = np.argmin(scores, axis=1)
  return tokens.reshape(pixels.shape[:-1])


def dequantize(tokens, centers) -> np.ndarray:
  """Tokens [...] -> float32 pixels [..., C] in [-1, 1]."""
  return np.asarray(centers, np.float32)[np.asarray(tokens)]


def save(path, centers) -> None:
  centers = np.asarray(centers, np.float32)
  assert centers.ndim == 2 and centers.shape[1] in (1, 3), centers.shape
  buffer = io.BytesIO()
  np.save(buffer, centers)
  storage.write_atomic(storage.path(path), buffer.getvalue())


def load(path, *, expect_k: int | None = None, expect_c: int | None = None) -> np.ndarray:
  """Reads and checks a palette file; every way it can be wrong for this run is a UserError naming the file."""
  path = storage.usable(path, what="palette file")
  if not path.exists():
    raise UserError(f"palette file {path} not found")
  try:
    centers = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  except ValueError as e:
    raise UserError(f"palette file {path} is not a .npy array: {e}") from None
  if centers.ndim != 2 or centers.shape[1] not in (1, 3):
    raise UserError(f"palette file {path} must hold a [K, C] array with C = 1 or 3, got shape {centers.shape}")
  if not np.issubdtype(centers.dtype, np.floating):
    raise UserError(f"palette file {path} must hold floats in [-1, 1], got dtype {centers.dtype}")
  if not (np.all(np.isfinite(centers)) and np.abs(centers).max(initial=0.0) <= 1.0):
    raise UserError(f"palette file {path} has values outside [-1, 1] (pixels must be scaled as x / 127.5 - 1)")
  k, c = centers.shape
  if expect_k is not None and k != expect_k:
    raise UserError(f"palette file {path} has {k} colours but config.palette.size is {expect_k}")
  if expect_c is not None and c != expect_c:
    raise UserError(f"palette file {path} has {c} channels but config.dataset.channels is {expect_c}")
  return centers.astype(np.float32)
