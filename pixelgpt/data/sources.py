"""Random-access sources of real images: record i -> {"image": uint8 [H, W, C], "label": int32}.

Sources are picklable (grain workers receive a copy) and read big files lazily, in the process that uses them;
every mistake a user can make in naming or placing the data is a UserError here, before any work starts.
"""

import functools
import gzip
import io
import os
import sys
import threading

from etils import epath
import numpy as np
from PIL import Image

from pixelgpt import storage
from pixelgpt.errors import UserError

FORMS = "'digits', 'fashion_mnist', 'folder:<path>' or 'tfds:<name>'"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
HOLDOUT_FRACTION = 0.1  # of a folder without split sub-folders, held out as "test"
_DIGITS_TRAIN = 1500  # of scikit-learn's 1,797; the other 297 are "test"
_SPLIT_SEED = 0  # fixed forever: changing it would silently move images between train and test


def get_source(dataset_cfg, split: str):
  """The source of `split` ('train', 'test', ...) of the dataset named by `dataset_cfg.name`."""
  name = dataset_cfg.name
  if name == "digits":
    return _digits(split)
  if name == "fashion_mnist":
    return _fashion_mnist(storage.usable(dataset_cfg.data_dir or FASHION_MNIST_DIR, what="config.dataset.data_dir"),
                          split)
  if name.startswith("folder:") and name != "folder:":
    root = storage.usable(name.removeprefix("folder:"), what="config.dataset.name folder:")
    return _folder(root, split, dataset_cfg.channels, dataset_cfg.get("skip_unreadable", True))
  if name.startswith("tfds:") and name != "tfds:":
    data_dir = dataset_cfg.data_dir and storage.usable(dataset_cfg.data_dir, what="config.dataset.data_dir")
    return _tfds(name.removeprefix("tfds:"), split, data_dir and str(data_dir))
  raise UserError(f"config.dataset.name {name!r} is not a dataset: use {FORMS}")


def _record(image: np.ndarray, label) -> dict[str, np.ndarray]:
  image = np.asarray(image, np.uint8)
  return {"image": image[..., None] if image.ndim == 2 else image, "label": np.int32(label)}


def _check_split(dataset: str, split: str, known) -> None:
  if split not in known:
    raise UserError(f"dataset {dataset!r} has no split {split!r}: use one of {sorted(known)}")


class ArraySource:
  """Images and labels held as arrays, loaded on first access by `load()` (which must pickle)."""

  def __init__(self, load):
    self._load = load
    self._arrays = None

  def _get(self):
    if self._arrays is None:
      self._arrays = self._load()
    return self._arrays

  def __len__(self) -> int:
    return len(self._get()[1])

  def __getitem__(self, index: int):
    images, labels = self._get()
    return _record(images[index], labels[index])

  def label(self, index: int) -> int:
    return int(self._get()[1][index])

  def __getstate__(self):
    # Workers reload the arrays themselves instead of receiving tens of megabytes through a pipe.
    return {"_load": self._load, "_arrays": None}


# --- digits: scikit-learn's 8×8 handwritten digits, the embedded default -------------------------------------

def _digits(split: str) -> ArraySource:
  _check_split("digits", split, ("train", "test"))
  return ArraySource(functools.partial(_load_digits, split))


def _load_digits(split: str):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this source needs it)
  digits = datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 17 grey levels 0..16 -> 0..255
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
  keep = order[:_DIGITS_TRAIN] if split == "train" else order[_DIGITS_TRAIN:]
  return images[keep], digits.target[keep].astype(np.int32)


# --- fashion_mnist: idx files ---------------------------------------------------------------------------------

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _fashion_mnist(data_dir, split: str) -> ArraySource:
  _check_split("fashion_mnist", split, _IDX_PREFIX)
  paths = []
  for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
    stem = data_dir / f"{_IDX_PREFIX[split]}-{kind}"
    found = [p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()]
    if not found:
      raise UserError(f"fashion_mnist file {stem}[.gz] not found: install Debian's dataset-fashion-mnist "
                      "or set config.dataset.data_dir")
    paths.append(found[0])
  return ArraySource(functools.partial(_load_idx_pair, *paths))


def _load_idx_pair(images_path, labels_path):
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise UserError(f"idx files {images_path} {images.shape} and {labels_path} {labels.shape} do not pair up")
  return images, labels.astype(np.int32)


def read_idx(path) -> np.ndarray:
  """An unsigned-byte idx array (the MNIST file format), gzipped or not."""
  path = storage.path(path)
  data = path.read_bytes()
  if path.name.endswith(".gz"):
    data = gzip.decompress(data)
  # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dims, then each dim as uint32 BE.
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise UserError(f"{path} is not an unsigned-byte idx file (bad magic number {data[:4].hex()})")
  ndim = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(dims)):
    raise UserError(f"{path} is truncated or corrupt: header says {dims}, file has {len(data) - offset} bytes")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


# --- folder:<path>: one sub-folder of image files per class ----------------------------------------------------

SKIPPED: set[str] = set()  # unreadable files met by this process, each reported once
_SKIPPED_LOCK = threading.Lock()  # grain reads with several threads: one report per file, counted in order


class FolderSource:
  """Image files decoded with PIL on access (so only what is read is decoded), as L or RGB.

  An unreadable file is skipped: the next readable file in order takes its place (so batches keep their shape
  and the order stays deterministic) and it is reported once with the count so far; with skip_unreadable=False
  it ends the run with one line naming the file.
  """

  def __init__(self, paths: list[str], labels: list[int], channels: int, skip_unreadable: bool = True):
    self._paths, self._labels, self._mode = paths, labels, "L" if channels == 1 else "RGB"
    self._skip = skip_unreadable

  def __len__(self) -> int:
    return len(self._paths)

  def label(self, index: int) -> int:
    return self._labels[index]  # from the class folder: no image is opened

  def __getitem__(self, index: int):
    for offset in range(len(self._paths)):
      i = (index + offset) % len(self._paths)
      try:
        # The paths are already absolute or URLs (from storage.usable): no normalising on this hot path.
        with Image.open(io.BytesIO(epath.Path(self._paths[i]).read_bytes())) as image:
          return _record(np.asarray(image.convert(self._mode)), self._labels[i])
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        if not self._skip:
          raise UserError(f"unreadable image {self._paths[i]} ({type(e).__name__}); set "
                          f"config.dataset.skip_unreadable=True to skip such files") from None
        with _SKIPPED_LOCK:
          if self._paths[i] not in SKIPPED:
            SKIPPED.add(self._paths[i])
            print(f"pixelgpt: skipping unreadable image {self._paths[i]} ({len(SKIPPED)} so far)", file=sys.stderr,
                  flush=True)
    raise UserError(f"none of the {len(self._paths)} images in this split is readable")


def _folder(root, split: str, channels: int, skip_unreadable: bool = True) -> FolderSource:
  if not root.is_dir():
    raise UserError(f"image folder {root} not found (config.dataset.name 'folder:{root}')")
  split_dirs = _subdirs(root) if (root / split).is_dir() else []
  if split_dirs:
    # Labels come from the union of class folders, so a class missing from one split does not shift the others.
    classes = sorted({c for d in split_dirs for c in _subdirs(root / d)})
    files = _image_files(root / split, classes)
  else:
    if (root / "train").is_dir():
      raise UserError(f"image folder {root} has a train/ sub-folder but no {split}/")
    _check_split(f"folder:{root}", split, ("train", "test"))
    classes = _subdirs(root)
    files = _image_files(root, classes)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(files))
    n_test = max(1, round(HOLDOUT_FRACTION * len(files))) if len(files) > 1 else 0
    keep = order[:n_test] if split == "test" else order[n_test:]
    files = [files[i] for i in sorted(keep)]
  if not files:
    raise UserError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in class sub-folders of {root} for split {split!r}")
  return FolderSource([path for path, _ in files], [label for _, label in files], channels, skip_unreadable)


def _subdirs(path) -> list[str]:
  return sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p.is_dir())


def _image_files(root, classes: list[str]) -> list[tuple[str, int]]:
  """(path, label) of every image under root/<class>/, in a sorted order that does not depend on the OS."""
  return sorted((os.fspath(p), label) for label, name in enumerate(classes) for p in _images_under(root / name))


def _images_under(directory):
  """Image files under `directory`, recursively, with one listing per folder: on a bucket, asking each of a
  million files whether it is a folder would take a request each, so a name with an image suffix is a file."""
  if not directory.is_dir():  # a class with no folder in this split
    return
  for entry in directory.iterdir():
    if entry.name.lower().endswith(IMAGE_SUFFIXES):
      yield entry
    elif not entry.name.startswith("."):
      yield from _images_under(entry)


# --- tfds:<name>: an ArrayRecord-prepared TensorFlow Datasets dataset, read without TensorFlow ---------------------

class TfdsSource:
  """Adapts tfds records (any features, int labels) to this module's record layout."""

  def __init__(self, source, has_label: bool):
    self._source, self._has_label = source, has_label

  def __len__(self) -> int:
    return len(self._source)

  def label(self, index: int) -> int:
    return int(self[index]["label"])

  def __getitem__(self, index: int):
    example = self._source[index]
    # Unlabelled datasets (downsampled_imagenet) get label 0: pretraining never reads it.
    return _record(example["image"], example["label"] if self._has_label else 0)


def _tfds(name: str, split: str, data_dir: str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imported only when used)
  where = data_dir or "tfds's default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"tfds dataset {name!r} not found in {where} (config.dataset.name 'tfds:{name}')") from None
  if not builder.is_prepared():
    raise UserError(f"tfds dataset {name!r} is not prepared in {where}: run `tfds build {name} "
                    "--file_format=array_record` (needs TensorFlow) or set config.dataset.data_dir")
  _check_split(f"tfds:{name}", split, builder.info.splits.keys())
  features = builder.info.features
  if "image" not in features:
    raise UserError(f"tfds dataset {name!r} has no 'image' feature (features: {sorted(features.keys())})")
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError:  # prepared as TFRecord, which has no random access
    raise UserError(f"tfds dataset {name!r} in {where} is not in ArrayRecord format: rebuild it with "
                    f"`tfds build {name} --file_format=array_record`") from None
  return TfdsSource(source, "label" in features)
