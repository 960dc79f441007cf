"""gs:// end to end against a real Cloud Storage JSON API (fake-gcs-server on localhost): 2 processes train with a
gs:// workdir on tfds data in a bucket, are SIGKILLed (once mid-save) and end bit for bit where a local run ends;
every command reads the gs:// workdir; a damaged checkpoint on the bucket falls back; unusable buckets are one line.

The test process itself never opens a Cloud Storage client: it reads and writes objects through the server's own
HTTP API (tests/gcs_server.py) and runs pixelgpt in subprocesses pointed at the server, as a user's machine would be.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import urllib.error

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pixelgpt import metrics as metrics_lib
from tests.conftest import REPO, finish_job, kill_job, pixelgpt_argv, run_pixelgpt, start_job, wait_for

BUCKET = "bucket"
TINY = ["--config.batch_size=16", "--config.model.n_layer=2", "--config.model.d_model=32", "--config.model.n_head=4",
        "--config.palette.fit_pixels=20000", "--config.log_every=1"]
RUN = ["--config.total_steps=16", "--config.checkpoint_every=4", "--config.keep_checkpoints=2",
       "--config.eval_every=8", "--config.dataset.name=tfds:pixelgpt_gcs_digits"]


class PixelgptGcsDigits(tfds.core.GeneratorBasedBuilder):
  """240 + 60 of scikit-learn's real 8×8 digits as a tfds dataset in ArrayRecord format (PNG-encoded images)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 240), "test": self._generate_examples(240, 300)}

  def _generate_examples(self, start, stop):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    for i in range(start, stop):
      encoded = io.BytesIO()
      Image.fromarray(np.rint(digits.images[i] * 255 / 16).astype(np.uint8)).save(encoded, format="PNG")
      yield i, {"image": encoded.getvalue(), "label": int(digits.target[i])}


def _train(workdir, data_dir, *extra):
  return ["train", "--config", os.path.join(REPO, "configs", "smoke.py"), "--workdir", workdir,
          f"--config.dataset.data_dir={data_dir}", *TINY, *RUN, *extra]


def _two_processes(args, env, cwd, logs):
  return start_job(*args, processes=2, devices=4, logs=logs, env=env, cwd=cwd)


def _save_in_flight(gcs, prefix):
  """A step directory with objects but without orbax's commit marker: an asynchronous save still writing."""
  names = gcs.objects(BUCKET, f"{prefix}/checkpoints/")
  steps = {n.split("/")[2] for n in names if n.split("/")[2].isdigit()}
  return any(f"{prefix}/checkpoints/{s}/commit_success.txt" not in names for s in steps)


def _gs_metrics(gcs, prefix, tmp_path) -> list[dict]:
  """The run's logged steps as pixelgpt's reader sees them, from a fresh local copy of its metrics objects."""
  with tempfile.TemporaryDirectory(dir=tmp_path) as local:
    # The tail first, as read_metrics does: a seal replaces metrics.jsonl before it deletes the tail.
    for name in (metrics_lib.TAIL_FILE, metrics_lib.METRICS_FILE):
      try:
        data = gcs.read(BUCKET, f"{prefix}/{name}")
      except urllib.error.HTTPError as e:
        assert e.code == 404, e  # not written yet, or a tail already sealed into metrics.jsonl
        continue
      with open(os.path.join(local, name), "wb") as f:
        f.write(data)
    return metrics_lib.read_metrics(local)


def _state_leaves(checkpoint_dir):
  """The saved train state's arrays, restored whole onto this process's first device (whatever mesh saved it)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(checkpoint_dir, "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
  """A tfds dataset uploaded to gs://bucket/tfds, a reference 2-process run on local disk, and the same run on
  gs://bucket/run, SIGKILLed once during an asynchronous save and once between checkpoints, then finished."""
  tmp = tmp_path_factory.mktemp("gs_run")
  PixelgptGcsDigits(data_dir=str(tmp / "tfds"), file_format="array_record").download_and_prepare()
  gcs.upload(str(tmp / "tfds"), BUCKET, "tfds")
  cwd = tmp / "cwd"  # the gs:// runs' working directory: it must stay empty
  os.makedirs(cwd)

  reference = str(tmp / "reference")
  finish_job(_two_processes(_train(reference, tmp / "tfds"), gcs.env, REPO, tmp))

  args = _train(f"gs://{BUCKET}/run", f"gs://{BUCKET}/tfds")
  procs = _two_processes(args, gcs.env, cwd, tmp)
  assert wait_for(lambda: _save_in_flight(gcs, "run"), procs), "the run ended before a save was seen in flight"
  kill_job(procs)
  before = len(_gs_metrics(gcs, "run", tmp))
  procs = _two_processes(args, gcs.env, cwd, tmp)
  assert wait_for(lambda: len(_gs_metrics(gcs, "run", tmp)) >= before + 3, procs, poll=0.05)
  kill_job(procs)
  out = finish_job(_two_processes(args, gcs.env, cwd, tmp))
  resumed = int(out.split("resuming from step ")[1].split()[0])
  assert 0 < resumed < 16, out[-3000:]
  return {"reference": reference, "tmp": tmp, "cwd": cwd, "tfds": str(tmp / "tfds")}


def test_killed_two_process_gs_run_ends_bitwise_equal_to_a_local_run(gcs, gs_run):
  tmp = gs_run["tmp"]
  local_copy = gcs.download(BUCKET, "run/checkpoints/16", str(tmp / "final16"))
  for x, y in zip(_state_leaves(local_copy), _state_leaves(os.path.join(gs_run["reference"], "checkpoints", "16"))):
    np.testing.assert_array_equal(x, y)  # parameters and optimizer state, bit for bit

  # metrics.jsonl holds every step once, with the reference's losses; no tail is left once the run ends.
  names = gcs.objects(BUCKET, "run/")
  assert "run/metrics.tail.jsonl" not in names
  logged = [json.loads(line) for line in gcs.read(BUCKET, "run/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in logged] == list(range(1, 17))
  reference = metrics_lib.read_metrics(gs_run["reference"])
  assert [(m["step"], m["train/loss"], m.get("eval/loss")) for m in logged] == \
      [(m["step"], m["train/loss"], m.get("eval/loss")) for m in reference]

  # Only committed steps remain (orbax removed the one killed mid-save), the iterator state of both processes is
  # in each, and the rest of the workdir is on the bucket: TensorBoard, samples, config, palette.
  steps = {n.split("/")[2] for n in names if n.startswith("run/checkpoints/")}
  assert steps == {"12", "16"} and all(f"run/checkpoints/{s}/commit_success.txt" in names for s in steps)
  assert {"run/checkpoints/16/data/process_0-of-2.json", "run/checkpoints/16/data/process_1-of-2.json"} <= set(names)
  assert {"run/config.json", "run/palette.npy", "run/samples/step_000016.png"} <= set(names)
  assert any(n.startswith("run/tb/events.out.tfevents") for n in names)
  # Nothing went to local disk: not the working directory, not a `gs:` folder in the checkout.
  assert os.listdir(gs_run["cwd"]) == [] and not os.path.exists(os.path.join(REPO, "gs:"))


def _command(gcs, cwd, *args):
  return run_pixelgpt(*args, env=gcs.env, cwd=cwd).stdout


def test_eval_sample_score_probe_finetune_and_convert_read_the_gs_workdir(gcs, gs_run, tmp_path):
  cwd, reference = gs_run["cwd"], gs_run["reference"]
  gs = f"gs://{BUCKET}/run"
  # eval: the same held-out NLL as the local run's, to the last digit.
  assert _command(gcs, cwd, "eval", "--workdir", gs).splitlines()[-1] == \
      _command(gcs, REPO, "eval", "--workdir", reference).splitlines()[-1]

  # sample: the same PNG bytes, written to the bucket (default path in the workdir, and an explicit --out).
  _command(gcs, cwd, "sample", "--workdir", gs, "--num", "4")
  _command(gcs, cwd, "sample", "--workdir", gs, "--num", "4", "--complete", "--keep_rows", "4",
           "--out", f"gs://{BUCKET}/out/completions.png")
  _command(gcs, REPO, "sample", "--workdir", reference, "--num", "4")
  assert gcs.read(BUCKET, "run/samples/sample_step000016_seed0.png") == \
      open(os.path.join(reference, "samples", "sample_step000016_seed0.png"), "rb").read()
  assert Image.open(io.BytesIO(gcs.read(BUCKET, "out/completions.png"))).size[0] > 0

  # score: tokens from the bucket, logits and NLL to the bucket, equal to the local run's.
  tokens = np.random.default_rng(0).integers(0, 16, (3, 64)).astype(np.int32)
  buffer = io.BytesIO()
  np.save(buffer, tokens)
  gcs.write(BUCKET, "in/tokens.npy", buffer.getvalue())
  np.save(tmp_path / "tokens.npy", tokens)
  _command(gcs, cwd, "score", "--workdir", gs, "--tokens", f"gs://{BUCKET}/in/tokens.npy",
           "--out", f"gs://{BUCKET}/out/score.npz")
  _command(gcs, REPO, "score", "--workdir", reference, "--tokens", tmp_path / "tokens.npy",
           "--out", tmp_path / "score.npz")
  remote, local = np.load(io.BytesIO(gcs.read(BUCKET, "out/score.npz"))), np.load(tmp_path / "score.npz")
  np.testing.assert_array_equal(remote["logits"], local["logits"])
  np.testing.assert_array_equal(remote["nll"], local["nll"])

  # probe: probe.json and probe.png land in the gs:// workdir.
  _command(gcs, cwd, "probe", "--workdir", gs, "--train_examples", "64", "--test_examples", "32")
  probe = json.loads(gcs.read(BUCKET, "run/probe.json"))
  assert probe["train_examples"] == 64 and len(probe["layers"]) == 3
  assert gcs.read(BUCKET, "run/probe.png").startswith(b"\x89PNG")

  # finetune: from the gs:// workdir into another one, its checkpoint committed there.
  _command(gcs, cwd, "finetune", "--workdir", gs, "--out", f"gs://{BUCKET}/finetuned", "--steps", "2")
  finetuned = json.loads(gcs.read(BUCKET, "finetuned/finetune.json"))
  assert finetuned["pretrained_workdir"] == gs and finetuned["steps"] == 2
  assert "finetuned/checkpoints/2/commit_success.txt" in gcs.objects(BUCKET, "finetuned/")

  # convert --to_hf from the gs:// workdir: the same safetensors as from the local one.
  if importlib.util.find_spec("transformers") is not None:  # the `hf` extra
    _command(gcs, cwd, "convert", "--to_hf", tmp_path / "hf_gs", "--workdir", gs)
    _command(gcs, REPO, "convert", "--to_hf", tmp_path / "hf_local", "--workdir", reference)
    assert (tmp_path / "hf_gs" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf_local" / "model.safetensors").read_bytes()
  assert os.listdir(cwd) == []


def test_a_damaged_checkpoint_on_gs_falls_back_to_the_previous_one(gcs, tmp_path):
  args = ["train", "--config", "configs/smoke.py", "--workdir", f"gs://{BUCKET}/damaged", *TINY,
          "--config.eval_every=0", "--config.checkpoint_every=4"]
  run_pixelgpt(*args, "--config.total_steps=8", devices=2, env=gcs.env)
  arrays = {n: size for n, size in gcs.objects(BUCKET, "damaged/checkpoints/8/state/").items()}
  victim = max(arrays, key=arrays.get)
  gcs.write(BUCKET, victim, gcs.read(BUCKET, victim)[:arrays[victim] // 2])

  proc = run_pixelgpt(*args, "--config.total_steps=12", devices=2, env=gcs.env)
  lines = [l for l in proc.stderr.splitlines() if "is damaged" in l]
  assert len(lines) == 1 and lines[0].startswith("pixelgpt: checkpoint 8 is damaged"), proc.stderr[-3000:]
  assert "damaged_checkpoints" in lines[0] and "resuming from step 4" in proc.stdout
  names = gcs.objects(BUCKET, "damaged/")
  assert any(n.startswith("damaged/damaged_checkpoints/8/state/") for n in names)
  # The set-aside copy has no commit marker: nothing will ever take it for a good checkpoint.
  assert "damaged/damaged_checkpoints/8/commit_success.txt" not in names
  steps = {n.split("/")[2] for n in names if n.startswith("damaged/checkpoints/")}
  assert steps == {"4", "8", "12"} and all(f"damaged/checkpoints/{s}/commit_success.txt" in names for s in steps)
  assert [m["step"] for m in _gs_metrics(gcs, "damaged", tmp_path)] == list(range(1, 13))


def test_unfinished_steps_are_removed_by_the_trainer_and_left_to_a_writer_by_readers(gcs):
  # What a first save killed mid-write leaves on a bucket: objects under checkpoints/4/ and no commit marker.
  gcs.write(BUCKET, "first/checkpoints/4/state/leftover", b"partial")
  run_pixelgpt("train", "--config", "configs/smoke.py", "--workdir", f"gs://{BUCKET}/first", *TINY,
               "--config.eval_every=0", "--config.total_steps=4", "--config.checkpoint_every=4", devices=2,
               env=gcs.env)
  names = gcs.objects(BUCKET, "first/checkpoints/")
  assert "first/checkpoints/4/state/leftover" not in names and "first/checkpoints/4/commit_success.txt" in names
  # A step that a still-running trainer is writing: eval reads the workdir beside it and deletes nothing.
  gcs.write(BUCKET, "first/checkpoints/8/state/in_flight", b"partial")
  run_pixelgpt("eval", "--workdir", f"gs://{BUCKET}/first", env=gcs.env)
  assert "first/checkpoints/8/state/in_flight" in gcs.objects(BUCKET, "first/checkpoints/")


def test_transient_storage_errors_during_saves_are_retried_and_change_nothing(gcs, tmp_path):
  from tests.gcs_server import FlakyProxy  # pylint: disable=g-import-not-at-top
  args = [*TINY, "--config.eval_every=0", "--config.checkpoint_every=4", "--config.total_steps=8"]
  proxy = FlakyProxy(gcs, fail_every=4)
  try:
    run_pixelgpt("train", "--config", "configs/smoke.py", "--workdir", f"gs://{BUCKET}/flaky", *args, devices=2,
                 env=proxy.env)
  finally:
    proxy.stop()
  # Every 4th upload was refused, checkpoint arrays among them (tensorstore names the object in the URL).
  assert any("flaky/checkpoints/" in path for path in proxy.failed), proxy.failed
  run_pixelgpt("train", "--config", "configs/smoke.py", "--workdir", tmp_path / "local", *args, devices=2)
  remote = gcs.download(BUCKET, "flaky/checkpoints/8", str(tmp_path / "flaky8"))
  for x, y in zip(_state_leaves(remote), _state_leaves(tmp_path / "local" / "checkpoints" / "8")):
    np.testing.assert_array_equal(x, y)
  losses = lambda lines: [(m["step"], m["train/loss"], m["grad_norm"]) for m in lines]
  assert losses(_gs_metrics(gcs, "flaky", tmp_path)) == losses(metrics_lib.read_metrics(tmp_path / "local"))


def test_a_sweep_trains_and_reads_its_runs_on_gs(gcs, tmp_path):
  sweep_file = tmp_path / "tiny.py"
  sweep_file.write_text("from pixelgpt import config\n\ndef get_sweep():\n  c = config.base()\n"
                        "  c.update_from_flattened_dict({'total_steps': 3, 'log_every': 1, 'eval_every': 3, "
                        "'checkpoint_every': 3, 'batch_size': 16, 'model.n_layer': 1, 'model.d_model': 16, "
                        "'model.n_head': 2, 'palette.size': 8, 'palette.fit_pixels': 5000, 'sample_every': 0})\n"
                        "  return {'base': c, 'product': {'model.d_model': [16]}}\n")
  args = ["sweep", "--sweep", sweep_file, "--root", tmp_path / "results", "--workdir_root", f"gs://{BUCKET}/sweep"]
  first = run_pixelgpt(*args, env=gcs.env).stdout
  assert "training from scratch -> gs://bucket/sweep/d_model=16" in first
  assert "gs://bucket/sweep/d_model=16/checkpoints/3/commit_success.txt".removeprefix("gs://bucket/") in \
      gcs.objects(BUCKET, "sweep/")
  again = run_pixelgpt(*args, env=gcs.env).stdout
  assert "finished, skipped" in again and "1 finished" in again
  assert "True" in (tmp_path / "results" / "results.csv").read_text().splitlines()[1]


def test_an_unusable_bucket_is_one_line_and_exit_2_before_any_work(gcs, tmp_path):
  args = ["train", "--config", os.path.join(REPO, "configs", "smoke.py"), "--workdir"]
  cwd = tmp_path / "cwd"
  os.makedirs(cwd)

  def one_line(proc, message):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]

  one_line(run_pixelgpt(*args, "gs://no-such-bucket/run", env=gcs.env, cwd=cwd, check=False),
           "bucket gs://no-such-bucket does not exist")
  one_line(run_pixelgpt(*args, f"gs://{BUCKET}/run2", "--config.dataset.data_dir=gs://missing-data/tfds",
                        "--config.dataset.name=tfds:pixelgpt_gcs_digits", env=gcs.env, cwd=cwd, check=False),
           "bucket gs://missing-data does not exist")
  # No emulator, no key file, no gcloud login (an empty HOME), not on Google Cloud: no credentials.
  bare = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR", "GCE_"))}
  proc = subprocess.run(pixelgpt_argv(*args, f"gs://{BUCKET}/run3"), cwd=cwd, capture_output=True, text=True,
                        env=dict(bare, HOME=str(tmp_path), JAX_PLATFORMS="cpu", NO_GCE_CHECK="true"), timeout=300)
  one_line(proc, "no Google Cloud credentials")
  # gcsfs missing: epath has no backend for gs://.
  code = ("import sys; sys.modules['gcsfs'] = None; from pixelgpt import cli; "
          f"sys.exit(cli.main(['pixelgpt', *{[str(a) for a in args]!r}, 'gs://{BUCKET}/run4', '--cpu_devices=1']))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **gcs.env), timeout=300)
  one_line(proc, "needs the gcsfs package")
  assert os.listdir(cwd) == [] and not any(n.startswith(("run2/", "run3/", "run4/")) for n in gcs.objects(BUCKET))
