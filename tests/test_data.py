"""Tests of the data sources and the grain pipeline: seeded order, exact resume (also through orbax), process
sharding of global batches, one padded eval pass, and every dataset form read from real files."""

import gzip
import io
import os
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from pixelgpt import palette as palette_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt.data import pipeline
from pixelgpt.data import sources
from pixelgpt.errors import UserError
from tests.conftest import load_config

GREYS = np.linspace(-1, 1, 16, dtype=np.float32)[:, None]  # a fixed 16-grey palette: no k-means needed here
RGB8 = np.array([[r, g, b] for r in (-1, 1) for g in (-1, 1) for b in (-1, 1)], np.float32)


def _digits_config(**overrides):
  return load_config("smoke", **{"batch_size": 16, **overrides})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- the training iterator -----------------------------------------------------------------------------------------

def test_train_batches_have_the_promised_layout_and_token_range():
  config = _digits_config(**{"dataset.resolution": 12})  # 8×8 digits enlarged to 12×12
  batch = next(pipeline.make_train_iterator(config, GREYS))
  assert batch["tokens"].shape == (16, 144) and batch["tokens"].dtype == np.int32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() < len(GREYS)
  assert set(batch["label"]) <= set(range(10))


def test_same_seed_same_batches_other_seed_other_batches():
  config = _digits_config(**{"dataset.flip": True})
  first = _take(pipeline.make_train_iterator(config, GREYS), 3)
  _assert_same_batches(first, _take(pipeline.make_train_iterator(config, GREYS), 3))
  other = _take(pipeline.make_train_iterator(_digits_config(**{"dataset.flip": True, "seed": 1}), GREYS), 3)
  assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])


def test_each_epoch_holds_every_example_once_in_a_new_order():
  config = _digits_config(batch_size=500)  # digits' 1,500 training images: 3 batches per epoch
  batches = _take(pipeline.make_train_iterator(config, GREYS), 6)
  source = sources.get_source(config.dataset, "train")
  split_labels = np.bincount([source[i]["label"] for i in range(len(source))], minlength=10)
  for epoch in (batches[:3], batches[3:]):
    np.testing.assert_array_equal(np.bincount(np.concatenate([b["label"] for b in epoch]), minlength=10),
                                  split_labels)
  assert not np.array_equal(batches[0]["tokens"], batches[3]["tokens"])


def test_resume_from_get_state_continues_exactly():
  config = _digits_config(**{"dataset.flip": True})
  iterator = pipeline.make_train_iterator(config, GREYS)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = pipeline.make_train_iterator(config, GREYS)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), expected)


def test_resume_through_an_orbax_checkpoint_with_grains_handler(tmp_path):
  config = _digits_config(**{"dataset.flip": True})
  reference = _take(pipeline.make_train_iterator(config, GREYS), 8)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
    iterator = pipeline.make_train_iterator(config, GREYS)
    _take(iterator, 5)
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                            data=grain.checkpoint.CheckpointSave(iterator)))
    _take(iterator, 2)  # the saved state is the one at save time, even while an async save is in flight
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
    fresh = pipeline.make_train_iterator(config, GREYS)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}), data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["data"] is fresh
  np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
  _assert_same_batches(_take(fresh, 3), reference[5:])


@pytest.mark.parametrize("rows", [range(8), range(8, 16), [0, 1, 6, 7, 12, 13]])
def test_a_process_reads_exactly_its_rows_of_each_global_batch_and_resumes(rows):
  config = _digits_config(**{"dataset.flip": True})
  whole = _take(pipeline.make_train_iterator(config, GREYS), 4)
  iterator = pipeline.make_train_iterator(config, GREYS, rows=rows)
  mine = _take(iterator, 2)
  # The state counts global batches: it resumes another process's (or a whole-batch) iterator in step.
  resumed = pipeline.make_train_iterator(config, GREYS)
  resumed.set_state(iterator.get_state())
  _assert_same_batches(_take(resumed, 2), whole[2:])
  for step, batch in enumerate(mine):
    assert batch["tokens"].shape == (len(rows), 64)
    for key in batch:  # the same global batch (flips included), only these rows of it
      np.testing.assert_array_equal(batch[key], whole[step][key][list(rows)])


def test_flips_are_seeded_per_example_and_mirror_images():
  plain = next(pipeline.make_train_iterator(_digits_config(batch_size=64), GREYS))["tokens"].reshape(64, 8, 8)
  flipped = next(pipeline.make_train_iterator(_digits_config(batch_size=64, **{"dataset.flip": True}), GREYS))
  flipped = flipped["tokens"].reshape(64, 8, 8)
  same = np.all(flipped == plain, axis=(1, 2))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2))
  assert np.all(same | mirrored)
  assert 10 < np.sum(mirrored & ~same) and 10 < np.sum(same & ~mirrored)  # about half of 64 each way


def test_worker_processes_give_the_in_process_batches_and_resume():
  expected = _take(pipeline.make_train_iterator(_digits_config(), GREYS), 6)
  config = _digits_config(**{"dataset.worker_count": 2})
  iterator = pipeline.make_train_iterator(config, GREYS)
  _assert_same_batches(_take(iterator, 4), expected[:4])
  resumed = pipeline.make_train_iterator(config, GREYS)
  resumed.set_state(iterator.get_state())
  _assert_same_batches(_take(resumed, 2), expected[4:])
  iterator.close()
  resumed.close()


# --- the eval pass -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eval_examples, expected_n", [(0, 297), (40, 40)])
def test_eval_pass_covers_each_example_once_with_a_padding_mask(eval_examples, expected_n):
  config = _digits_config(batch_size=32, **{"dataset.eval_examples": eval_examples})
  per_process = [list(pipeline.make_eval_batches(config, GREYS, rows=range(16 * p, 16 * p + 16))) for p in (0, 1)]
  assert len(per_process[0]) == len(per_process[1]) == -(-expected_n // 32)
  rows = {key: np.concatenate([b[key] for pair in zip(*per_process) for b in pair])
          for key in ("tokens", "label", "mask")}
  assert rows["mask"].dtype == np.float32 and rows["tokens"].shape[1] == 64
  np.testing.assert_array_equal(rows["mask"], np.arange(len(rows["mask"])) < expected_n)
  source = sources.get_source(config.dataset, "test")
  for i in (0, expected_n // 2, expected_n - 1):  # the dataset's order, nothing shuffled or flipped
    record = pipeline.encode(source[i], centers=GREYS, resolution=8, channels=1)
    np.testing.assert_array_equal(rows["tokens"][i], record["tokens"])
    assert rows["label"][i] == record["label"]


# --- per-record transforms and the palette's pixels ----------------------------------------------------------------

def test_resize_averages_boxes_when_shrinking_and_converts_channels():
  grey = np.repeat(np.repeat(np.array([[0, 100], [200, 40]], np.uint8), 3, 0), 3, 1)[..., None]  # 6×6 blocks
  np.testing.assert_array_equal(pipeline.resize(grey, 2, 1)[..., 0], [[0, 100], [200, 40]])
  rgb = pipeline.resize(grey, 2, 3)
  assert rgb.shape == (2, 2, 3) and np.all(rgb == rgb[..., :1])
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  assert pipeline.resize(red, 4, 1)[0, 0, 0] == 76  # ITU-R 601 luma of pure red
  assert pipeline.resize(red, 9, 3).shape == (9, 9, 3)


def test_sample_pixels_is_seeded_and_on_the_images_grey_levels():
  config = _digits_config()
  pixels = pipeline.sample_pixels(config, 5000, seed=0)
  assert pixels.shape == (5000, 1) and pixels.dtype == np.float32
  np.testing.assert_array_equal(pixels, pipeline.sample_pixels(config, 5000, seed=0))
  assert not np.array_equal(pixels, pipeline.sample_pixels(config, 5000, seed=1))
  digit_levels = palette_lib.to_unit(np.rint(np.arange(17) * 255 / 16))
  assert set(np.unique(pixels)) <= set(digit_levels)


@pytest.mark.parametrize("per_key", [False, True])
def test_to_global_shards_every_key_over_the_batch_axis(per_key):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  host = next(pipeline.make_eval_batches(_digits_config(), GREYS))
  if per_key:
    sharding = {key: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")) for key in host}
  batch = pipeline.to_global(host, sharding, len(host["tokens"]))
  for key in host:
    np.testing.assert_array_equal(np.asarray(batch[key]), host[key])
    assert batch[key].sharding.spec[0] == "data"
    assert len(batch[key].addressable_shards) == len(jax.devices())


@pytest.mark.parametrize("order", ["data,fsdp,tensor", "tensor,fsdp,data", "data,tensor,fsdp"])
def test_mesh_axis_order_puts_the_innermost_axis_on_neighbours_and_each_device_gets_its_rows(order):
  config = _digits_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.axis_order": order})
  mesh = sharding_lib.make_mesh(config.mesh)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  innermost = np.moveaxis(ids, sharding_lib.MESH_AXES.index(order.split(",")[-1]), -1)
  assert np.all(np.diff(innermost, axis=-1) == 1)  # consecutive devices: one host's
  host = next(pipeline.make_train_iterator(config, GREYS))
  batch = pipeline.to_global(host, sharding_lib.batch_sharding(mesh), config.batch_size)
  for (d, f, _), device in np.ndenumerate(mesh.devices):  # shard d·fsdp + f of the batch, tensor-replicated
    shard = next(s for s in batch["tokens"].addressable_shards if s.device == device)
    np.testing.assert_array_equal(np.asarray(shard.data), host["tokens"][(2 * d + f) * 4:(2 * d + f + 1) * 4])


# --- sources -------------------------------------------------------------------------------------------------------

def test_digits_splits_are_fixed_and_partition_the_1797_images():
  config = _digits_config()
  train, test = sources.get_source(config.dataset, "train"), sources.get_source(config.dataset, "test")
  assert (len(train), len(test)) == (1500, 297)
  record = train[0]
  assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
  assert record["label"].dtype == np.int32
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  everything = np.rint(datasets.load_digits().images * 255 / 16).astype(np.uint8)
  ours = np.stack([s[i]["image"][..., 0] for s in (train, test) for i in range(len(s))])
  assert sorted(map(bytes, ours)) == sorted(map(bytes, everything))


def _write_idx(path, array: np.ndarray):
  header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
  with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path):
  rng = np.random.default_rng(0)
  train_images, test_images = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 256, (3, 28, 28))
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
  _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7))
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 8, 7]))
  config = load_config("smoke", **{"dataset.name": "fashion_mnist", "dataset.data_dir": str(tmp_path)})
  train, test = sources.get_source(config.dataset, "train"), sources.get_source(config.dataset, "test")
  assert (len(train), len(test)) == (7, 3)
  np.testing.assert_array_equal(train[6]["image"][..., 0], train_images[6])
  np.testing.assert_array_equal(test[1]["image"][..., 0], test_images[1])
  assert (train[6]["label"], test[2]["label"]) == (6, 7)
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x08\x03\x00\x00")
  with pytest.raises(UserError, match="not an unsigned-byte idx file"):
    len(sources.get_source(config.dataset, "test"))


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
  config = load_config("smoke", **{"dataset.name": "fashion_mnist", "dataset.data_dir": str(tmp_path / "none")})
  with pytest.raises(UserError, match="install Debian's dataset-fashion-mnist or set config.dataset.data_dir"):
    sources.get_source(config.dataset, "train")


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist absent")
def test_fashion_mnist_from_the_debian_package():
  config = load_config("smoke", **{"dataset.name": "fashion_mnist"})
  train, test = sources.get_source(config.dataset, "train"), sources.get_source(config.dataset, "test")
  assert (len(train), len(test)) == (60_000, 10_000)
  assert train[0]["image"].shape == (28, 28, 1)
  # The published first labels: ankle boot, T-shirt, T-shirt, dress / ankle boot, pullover, trouser, trouser.
  assert [int(train[i]["label"]) for i in range(4)] == [9, 0, 0, 3]
  assert [int(test[i]["label"]) for i in range(4)] == [9, 2, 1, 1]


def _write_pngs(directory, colours: dict[str, tuple], per_class: int):
  for name, colour in colours.items():
    os.makedirs(directory / name, exist_ok=True)
    for i in range(per_class):
      Image.new("RGB", (6, 5), colour).save(directory / name / f"{i:02d}.png")


def _folder_config(path, channels=3):
  return load_config("smoke", **{"dataset.name": f"folder:{path}", "dataset.channels": channels,
                                 "dataset.resolution": 4})


def test_folder_holds_out_a_fixed_tenth_and_labels_sorted_classes(tmp_path):
  _write_pngs(tmp_path, {"b_red": (255, 0, 0), "a_blue": (0, 0, 255)}, per_class=10)
  config = _folder_config(tmp_path)
  train, test = sources.get_source(config.dataset, "train"), sources.get_source(config.dataset, "test")
  assert (len(train), len(test)) == (18, 2)
  records = [s[i] for s in (train, test) for i in range(len(s))]
  assert all(r["image"].shape == (5, 6, 3) for r in records)
  # a_blue is class 0, b_red class 1; every file lands in exactly one split.
  assert sorted(int(r["label"]) for r in records) == [0] * 10 + [1] * 10
  assert all(tuple(r["image"][0, 0]) == ((0, 0, 255) if r["label"] == 0 else (255, 0, 0)) for r in records)
  again = sources.get_source(config.dataset, "test")
  assert [again[i]["image"].tobytes() for i in range(2)] == [test[i]["image"].tobytes() for i in range(2)]
  grey = sources.get_source(_folder_config(tmp_path, channels=1).dataset, "train")
  assert grey[0]["image"].shape == (5, 6, 1)


def test_folder_with_split_subfolders_feeds_the_pipeline(tmp_path):
  _write_pngs(tmp_path / "train", {"cat": (10, 20, 30), "dog": (250, 240, 230)}, per_class=4)
  _write_pngs(tmp_path / "test", {"dog": (250, 240, 230)}, per_class=2)
  config = _folder_config(tmp_path)
  config.batch_size = 4
  test = sources.get_source(config.dataset, "test")
  assert len(test) == 2 and int(test[0]["label"]) == 1  # classes come from all splits: a missing cat shifts nothing
  batch = next(pipeline.make_train_iterator(config, RGB8))
  assert batch["tokens"].shape == (4, 16)
  dark, light = palette_lib.quantize(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), RGB8)
  assert all(set(row) == {dark if label == 0 else light} for row, label in zip(batch["tokens"], batch["label"]))


@pytest.mark.parametrize("name, message", [
    ("imagenet", "is not a dataset"),
    ("folder:", "is not a dataset"),
    ("folder:/nonexistent/images", "not found"),
])
def test_bad_dataset_names_are_one_line_user_errors(name, message):
  with pytest.raises(UserError, match=message) as error:
    sources.get_source(load_config("smoke", **{"dataset.name": name}).dataset, "train")
  assert "\n" not in str(error.value)


def test_unknown_split_and_empty_folder_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="no split 'validation'"):
    sources.get_source(_digits_config().dataset, "validation")
  os.makedirs(tmp_path / "empty_class")
  with pytest.raises(UserError, match="no images"):
    sources.get_source(_folder_config(tmp_path).dataset, "train")


# --- tfds:<name> over ArrayRecord, without TensorFlow ----------------------------------------------------------------

class PixelgptTinyImages(tfds.core.GeneratorBasedBuilder):
  """Ten 5×5 RGB images prepared as ArrayRecord: what `tfds build --file_format=array_record` leaves on disk."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(5, 5, 3)), "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(8), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      encoded = io.BytesIO()
      Image.fromarray(_tiny_image(i)).save(encoded, format="PNG")  # raw arrays would need TensorFlow to encode
      yield i, {"image": encoded.getvalue(), "label": i % 3}


def _tiny_image(i: int) -> np.ndarray:
  return np.random.default_rng(i).integers(0, 256, (5, 5, 3), dtype=np.uint8)


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  PixelgptTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = load_config("smoke", **{"dataset.name": "tfds:pixelgpt_tiny_images", "dataset.data_dir": str(tmp_path),
                                   "dataset.channels": 3, "dataset.resolution": 5, "batch_size": 4})
  train = sources.get_source(config.dataset, "train")
  assert len(train) == 8 and len(sources.get_source(config.dataset, "test")) == 2
  record = train[3]
  assert record["image"].dtype == np.uint8 and record["label"].dtype == np.int32
  # ArrayRecord preparation shuffles; every record is still one of ours, with its label.
  matches = [i for i in range(8) if np.array_equal(record["image"], _tiny_image(i))]
  assert len(matches) == 1 and record["label"] == matches[0] % 3
  batch = next(pipeline.make_train_iterator(config, RGB8))
  assert batch["tokens"].shape == (4, 25)
  assert "tensorflow" not in sys.modules
  with pytest.raises(UserError, match="no split 'validation'"):
    sources.get_source(config.dataset, "validation")
  config.dataset.name = "tfds:pixelgpt_no_such_dataset"
  with pytest.raises(UserError, match="not found"):
    sources.get_source(config.dataset, "train")
