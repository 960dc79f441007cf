"""Grain pipelines: images -> palette tokens in global batches, each process decoding only the rows its devices hold.

One global order (a seeded shuffle, different every epoch) is cut into global batches of config.batch_size. A
process decodes the rows of each that `sharding.local_rows` names (those its devices hold under the batch's
sharding, on any mesh) and `to_global` hands each device its own, so the data a run sees does not depend on the
mesh or on how many processes read it, and the iterator state (one index: global batches consumed) resumes it
exactly, also through orbax and onto another mesh or process count.
"""

from concurrent import futures
import functools
from typing import Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np
from PIL import Image

from pixelgpt import palette as palette_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt.data import sources

MIN_FIT_IMAGES = 300  # palette pixels come from at least this many images, so no few images dominate the colours
# Elements are whole host batches: a couple in flight overlap decoding with the train step without hoarding memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_READ_THREADS = 16  # for sample_pixels' one-off random reads (a bucket's latency, not CPU, is the limit there)


def resize(image: np.ndarray, resolution: int, channels: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [resolution, resolution, channels]: grey <-> RGB, then BOX down / BILINEAR up."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  mode = "L" if channels == 1 else "RGB"
  if pil.mode != mode:
    pil = pil.convert(mode)
  if pil.size != (resolution, resolution):
    # BOX averages every source pixel, so thin strokes survive shrinking; BILINEAR avoids blocks when enlarging.
    # Non-square images are squeezed to the square, not cropped, so nothing at the borders is lost.
    shrinking = pil.width >= resolution and pil.height >= resolution
    pil = pil.resize((resolution, resolution), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
  out = np.asarray(pil)
  return out[..., None] if out.ndim == 2 else out


def encode(record, *, centers: np.ndarray, resolution: int, channels: int, flip: bool = False):
  """A source record -> {"tokens": int32 [resolution²] in raster order, "label": int32}."""
  image = resize(record["image"], resolution, channels)
  if flip:
    image = image[:, ::-1]
  tokens = palette_lib.quantize(palette_lib.to_unit(image), centers).reshape(-1)
  return {"tokens": tokens, "label": np.int32(record["label"])}


def _encode_maybe_flipped(record, rng: np.random.Generator, **kwargs):
  # grain seeds rng from the pipeline seed and the element's global position: reproducible and resumable.
  return encode(record, flip=bool(rng.random() < 0.5), **kwargs)


def _encoder(config, centers) -> dict:
  return dict(centers=np.asarray(centers, np.float32), resolution=config.dataset.resolution,
              channels=config.dataset.channels)


def make_train_iterator(config, palette, *, rows: Sequence[int] | None = None):
  """Infinite iterator of `rows` (default: all) of each global batch: {"tokens": [R, T], "label": [R]}.

  A grain DatasetIterator: get_state()/set_state(), and saved by orbax through grain.checkpoint.CheckpointHandler.
  """
  source = sources.get_source(config.dataset, config.dataset.train_split)
  ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
  if config.dataset.flip:
    ds = ds.random_map(functools.partial(_encode_maybe_flipped, **_encoder(config, palette)))
  else:
    ds = ds.map(functools.partial(encode, **_encoder(config, palette)))
  return _host_batches(ds, config, rows)


def make_eval_batches(config, palette, *, rows: Sequence[int] | None = None,
                      indices: Sequence[int] | None = None) -> Iterator[dict]:
  """One pass over the eval split in order (or over its records `indices`), every process yielding the same
  number of batches.

  Yields `rows` (default: all) of each global batch, {"tokens": [R, T], "label": [R], "mask": float32 [R]}; the
  last global batch is padded with mask-0 rows, so sum(mask) over the distinct rows of all batches is the number
  of eval examples.
  """
  source = sources.get_source(config.dataset, config.dataset.eval_split)
  indices = range(eval_size(config, source)) if indices is None else [int(i) for i in indices]
  padded = -(-len(indices) // config.batch_size) * config.batch_size
  ds = grain.MapDataset.range(padded).map(
      functools.partial(_eval_example, source=source, indices=indices, **_encoder(config, palette)))
  return _host_batches(ds, config, rows)


def eval_size(config, source=None) -> int:
  """How many examples the eval pass reads: dataset.eval_examples of the eval split (0: all of it)."""
  source = source if source is not None else sources.get_source(config.dataset, config.dataset.eval_split)
  return len(source) if config.dataset.eval_examples == 0 else min(config.dataset.eval_examples, len(source))


def _eval_example(position: int, *, source, indices: Sequence[int], **encoder):
  if position < len(indices):
    return {**encode(source[indices[position]], **encoder), "mask": np.float32(1.0)}
  t = encoder["resolution"] ** 2
  return {"tokens": np.zeros((t,), np.int32), "label": np.int32(0), "mask": np.float32(0.0)}


class _RowsOfBatches(grain.MapDataset):
  """Element j is row rows[j mod R] of global batch j div R, where global batch k is the parent's elements
  [k·batch_size, (k+1)·batch_size): only those rows are ever read (and decoded) from the parent."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, rows: Sequence[int]):
    super().__init__(parent)
    self._batch_size, self._rows = batch_size, tuple(int(r) for r in rows)
    assert self._rows and all(0 <= r < batch_size for r in self._rows), (batch_size, rows)

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size * len(self._rows)

  def _parent_index(self, j: int) -> int:
    batch, i = divmod(j, len(self._rows))
    return batch * self._batch_size + self._rows[i]

  def __getitem__(self, j):
    if isinstance(j, slice):
      raise TypeError("rows of global batches are read in order, not sliced")
    return self._parent[self._parent_index(j)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(j) for j in indices])  # pylint: disable=protected-access


def _host_batches(ds: grain.MapDataset, config, rows: Sequence[int] | None):
  """Cuts a per-example dataset in global order into host batches of `rows` of each global batch, still lazily
  decoded: host batch k is global batch k's rows, so the iterator's state counts global batches."""
  rows = range(config.batch_size) if rows is None else rows
  ds = _RowsOfBatches(ds, config.batch_size, rows).batch(len(rows), drop_remainder=True)
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  if config.dataset.worker_count > 0:
    # grain reads its absl flags when starting workers; outside an absl app (tests, notebooks) use defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.dataset.worker_count,
                                                     per_worker_buffer_size=2))
  return iter(ds)


def sample_pixels(config, n_pixels: int, seed: int) -> np.ndarray:
  """A seeded sample of n_pixels training pixels after resizing, float32 [n, C] in [-1, 1], to fit the palette.

  Reads ⌈n_pixels / T⌉ random images (at least MIN_FIT_IMAGES, at most the split), not the whole split.
  """
  source = sources.get_source(config.dataset, config.dataset.train_split)
  resolution, channels = config.dataset.resolution, config.dataset.channels
  n_images = min(len(source), max(MIN_FIT_IMAGES, -(-n_pixels // resolution ** 2)))
  rng = np.random.default_rng(seed)
  picks = np.sort(rng.choice(len(source), n_images, replace=False))
  read = lambda i: resize(source[int(i)]["image"], resolution, channels).reshape(-1, channels)
  with futures.ThreadPoolExecutor(_READ_THREADS) as pool:
    pixels = np.concatenate(list(pool.map(read, picks)))
  keep = np.sort(rng.choice(len(pixels), min(n_pixels, len(pixels)), replace=False))
  return palette_lib.to_unit(pixels[keep])


def to_global(host_batch: dict[str, np.ndarray], sharding, batch_size: int) -> dict[str, jax.Array]:
  """This process's rows of a global batch of `batch_size` -> global arrays, each device given its own rows.

  `host_batch` holds the rows `sharding.local_rows` names, in that order (what the pipelines above yield for
  them). `sharding` is one NamedSharding, whose leading spec entries serve arrays of lower rank (label, mask), or
  a dict of them by key.
  """
  def put(key, x):
    x = np.asarray(x)
    named = sharding[key] if isinstance(sharding, Mapping) else sharding
    named = jax.sharding.NamedSharding(named.mesh, jax.sharding.PartitionSpec(*tuple(named.spec)[:x.ndim]))
    rows = sharding_lib.local_rows(named, batch_size)
    assert len(rows) == len(x), f"{key}: {len(x)} host rows, but this process's devices hold {len(rows)}"

    def shard(index):
      # A device holds consecutive rows, all among this process's (sorted) rows: one slice of the host batch.
      held = range(batch_size)[index[0]]
      start = int(np.searchsorted(rows, held.start))
      return x[(slice(start, start + len(held)), *index[1:])]
    return jax.make_array_from_callback((batch_size, *x.shape[1:]), named, shard)
  return {key: put(key, value) for key, value in host_batch.items()}
