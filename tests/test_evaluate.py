"""Sampling, scoring, eval, probe and fine-tuning on a trained workdir, through the public CLI."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pixelgpt import cli
from pixelgpt import evaluate
from pixelgpt import model as model_lib
from pixelgpt import sample as sample_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import train
from pixelgpt import workdir as workdir_lib
from pixelgpt.data import pipeline
from pixelgpt.data import sources
from tests.conftest import load_config
from tests.test_model import SMALL, _params

TINY = {"total_steps": 40, "log_every": 10, "eval_every": 40, "checkpoint_every": 40, "batch_size": 32,
        "model.n_layer": 2, "model.d_model": 32, "model.n_head": 4, "palette.fit_pixels": 20_000}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.run(load_config("smoke", **TINY), workdir, devices=jax.devices()[:2])
  return workdir


@pytest.mark.parametrize("keep", [0, 37])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_cached_sampler_draws_the_same_tokens_as_the_naive_one(keep, temperature, top_k):
  cfg = dataclasses.replace(SMALL, seq_len=64)
  params, model = _params(cfg), model_lib.Transformer(cfg)
  prefix = jax.random.randint(jax.random.key(5), (6, 64), 0, cfg.vocab_size)
  kwargs = dict(keep=keep, temperature=temperature, top_k=top_k)
  cached = jax.jit(lambda r, x: sample_lib.sample(model, params, r, x, **kwargs))(jax.random.key(1), prefix)
  naive = jax.jit(lambda r, x: sample_lib.sample_naive(model, params, r, x, **kwargs))(jax.random.key(1), prefix)
  np.testing.assert_array_equal(cached, naive)
  np.testing.assert_array_equal(cached[:, :keep], prefix[:, :keep])
  assert float(jnp.mean(cached[:, keep:] != prefix[:, keep:])) > 0.5  # really sampled, not copied
  other = jax.jit(lambda r, x: sample_lib.sample(model, params, r, x, **kwargs))(jax.random.key(2), prefix)
  assert bool(jnp.any(other != cached))


def test_sample_and_complete_write_png_grids(trained, tmp_path, capsys):
  out = str(tmp_path / "samples.png")
  assert cli.main(["pixelgpt", "sample", "--workdir", trained, "--out", out, "--num", "9"]) == 0
  assert "samples/s" in capsys.readouterr().out
  assert Image.open(out).size[0] >= 256
  out = str(tmp_path / "completions.png")
  assert cli.main(["pixelgpt", "sample", "--workdir", trained, "--out", out, "--complete", "--keep_rows", "4",
                   "--num", "3", "--completions", "2"]) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape[1] > grid.shape[0]  # 3 rows of (kept rows | 2 completions | original)


def test_score_agrees_with_eval_and_the_training_loss(trained, tmp_path, capsys):
  run = workdir_lib.open_run(trained)
  config = run.config
  held_out = np.concatenate([b["tokens"][b["mask"] > 0] for b in pipeline.make_eval_batches(config, run.palette)])
  np.save(tmp_path / "tokens.npy", held_out)
  out = str(tmp_path / "scores.npz")
  assert cli.main(["pixelgpt", "score", "--workdir", trained, "--tokens", str(tmp_path / "tokens.npy"),
                   "--out", out]) == 0
  scores = np.load(out)
  logits, nll = scores["logits"], scores["nll"]
  assert logits.shape == held_out.shape + (config.palette.size,) and logits.dtype == np.float32
  # The logits' own NLL is the reported nll ...
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  own = -np.take_along_axis(log_probs, held_out[..., None], axis=-1)[..., 0].mean(axis=1)
  np.testing.assert_allclose(own, nll, rtol=1e-5)
  # ... equals `pixelgpt eval` on the same held-out split ...
  capsys.readouterr()
  assert cli.main(["pixelgpt", "eval", "--workdir", trained]) == 0
  reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  np.testing.assert_allclose(reported["nll_nats_per_token"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(reported["nll_bits_per_token"], nll.mean() / math.log(2), rtol=1e-5)
  # ... and the training loss function on the same tokens.
  total, count = train.nll_sums(run.setup.model, run.params, {"tokens": jnp.asarray(held_out[:32])},
                                jax.random.key(0), config.model.bert_mask_prob)
  np.testing.assert_allclose(float(total / count), nll[:32].mean(), rtol=1e-5)
  # Position 0 is predicted from the start-of-sequence vector alone: identical for every image.
  np.testing.assert_allclose(logits[:, 0], np.broadcast_to(logits[0, 0], logits[:, 0].shape), atol=1e-5)


def test_score_rejects_tokens_of_the_wrong_shape(trained, tmp_path, capsys):
  np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.int32))
  assert cli.main(["pixelgpt", "score", "--workdir", trained, "--tokens", str(tmp_path / "bad.npy"),
                   "--out", str(tmp_path / "o.npz")]) == 2
  assert "tokens must be [N, 64]" in capsys.readouterr().err


def test_probe_chooses_on_validation_and_reads_test_once(trained, capsys):
  assert cli.main(["pixelgpt", "probe", "--workdir", trained]) == 0
  with open(os.path.join(trained, "probe.json")) as f:
    result = json.load(f)
  layers = result["layers"]
  assert [r["layer"] for r in layers] == list(range(TINY["model.n_layer"] + 1))
  assert (result["dataset"], result["train_split"], result["test_split"]) == ("digits", "train", "test")
  assert (result["train_examples"], result["val_examples"], result["test_examples"]) == (1500, 150, 297)
  # The layer is the best on validation; test accuracy exists for it alone.
  assert result["best_layer"] == max(layers, key=lambda r: (r["val_accuracy"], -r["layer"]))["layer"]
  assert all("test_accuracy" not in r for r in layers)
  # This 40-step, 2×32 model reaches 52% (chance 10%); palette pixels 98% (digits are easy at 8×8). A held-out
  # choice generalises: the chosen layer's test accuracy is near its validation accuracy.
  chosen = next(r for r in layers if r["layer"] == result["best_layer"])
  assert 0.45 < result["test_accuracy"] and abs(result["test_accuracy"] - chosen["val_accuracy"]) < 0.1
  assert result["pixels"]["test_accuracy"] > 0.95
  assert os.path.getsize(os.path.join(trained, "probe.png")) > 1000
  assert "<- chosen: test accuracy" in capsys.readouterr().out


def test_streamed_features_are_those_of_one_forward_pass_and_passes_change_nothing(trained, tmp_path):
  run = workdir_lib.open_run(trained)
  config = evaluate._split_config(run.config, "test", 70)  # 3 batches of 32, the last padded
  with sharding_lib.activate(run.mesh):
    data = evaluate.feature_pass(run, config, [0, 2], pixels=True)
  keep = np.asarray(data["mask"]).reshape(-1) > 0
  assert keep.sum() == 70 and data["features"].shape == (2, 3, 32, TINY["model.d_model"])
  host = list(pipeline.make_eval_batches(config, run.palette))
  tokens = np.concatenate([b["tokens"] for b in host])[keep]
  whole = run.setup.model.apply({"params": run.params}, jnp.asarray(tokens), return_features=True)[1]
  streamed = np.asarray(data["features"]).reshape(2, -1, TINY["model.d_model"])[:, keep]
  np.testing.assert_allclose(streamed, np.asarray(whole)[[0, 2]], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(data["pixels"]).reshape(96, -1)[keep],
                                run.palette[tokens].reshape(70, -1))
  np.testing.assert_array_equal(np.asarray(data["label"]).reshape(-1)[keep],
                                np.concatenate([b["label"] for b in host])[keep])
  # One layer per pass over the data (a tiny memory budget) gives the probe of all layers at once.
  kwargs = dict(train_examples=300, test_examples=100)
  one_pass = evaluate.linear_probe(run, str(tmp_path), **kwargs)
  assert evaluate.layers_per_pass(run, 300, run.config.batch_size, 3, 2e-6) == 1
  per_layer = evaluate.linear_probe(run, str(tmp_path), feature_memory_gib=2e-6, **kwargs)
  assert per_layer == one_pass


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist absent")
def test_a_model_pretrained_on_digits_is_probed_on_fashion_mnist(trained, tmp_path, capsys):
  # Another dataset read at the model's 8×8: 28×28 Fashion-MNIST images are resized on the way in.
  assert cli.main(["pixelgpt", "probe", "--workdir", trained, "--config.dataset.name=fashion_mnist",
                   "--train_examples", "1000", "--test_examples", "300", "--layers", "1,2"]) == 0
  with open(os.path.join(trained, "probe.json")) as f:
    result = json.load(f)
  assert result["dataset"] == "fashion_mnist" and [r["layer"] for r in result["layers"]] == [1, 2]
  assert (result["train_examples"], result["test_examples"]) == (1000, 300)
  assert result["test_accuracy"] > 0.3  # ten classes of clothing, from digit features
  capsys.readouterr()
  assert cli.main(["pixelgpt", "probe", "--workdir", trained, "--config.dataset.name=fashion_mnist",
                   "--config.dataset.resolution=28"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "--config.dataset.resolution=28 does not match the model, trained at 8×8" in err
  assert cli.main(["pixelgpt", "eval", "--workdir", trained, "--config.model.n_layer=3"]) == 2
  assert "cannot change when a trained workdir is read" in capsys.readouterr().err


def test_finetune_reports_test_accuracy(trained, tmp_path):
  out = str(tmp_path / "ft")
  assert cli.main(["pixelgpt", "finetune", "--workdir", trained, "--out", out, "--steps", "100", "--lr", "0.01"]) == 0
  with open(os.path.join(out, "finetune.json")) as f:
    result = json.load(f)
  assert result["test_examples"] == 297 and result["test_accuracy"] > 0.3  # chance: 0.1
  assert os.listdir(os.path.join(out, "checkpoints")) == ["100"]


def test_bert_objective_trains_evaluates_and_probes(tmp_path, capsys):
  workdir = str(tmp_path / "bert")
  config = load_config("smoke", **TINY, **{"model.objective": "bert"})
  train.run(config, workdir, devices=jax.devices()[:2])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  # `pixelgpt eval`, on another mesh in another call, measures the masked NLL the trainer logged at its last step.
  assert cli.main(["pixelgpt", "eval", "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  assert "masked-position NLL" in out
  np.testing.assert_allclose(json.loads(out.splitlines()[-1])["nll_nats_per_token"], rows[-1]["eval/loss"],
                             rtol=1e-5)
  # Fine-tuning's L_gen is pretraining's masked-position NLL (same rng, same mask), not the NLL of visible tokens.
  run = workdir_lib.open_run(workdir)
  tokens = jnp.asarray(next(pipeline.make_train_iterator(run.config, run.palette))["tokens"])
  params = {"model": run.params, "classifier": {"kernel": jnp.zeros((TINY["model.d_model"], 10)),
                                                "bias": jnp.zeros((10,))}}
  rng, prob = jax.random.key(3), config.model.bert_mask_prob
  _, (generative, classification) = evaluate.finetune_loss(
      run.setup.model, params, {"tokens": tokens, "label": jnp.zeros(len(tokens), jnp.int32)}, rng, prob)
  total, count = train.nll_sums(run.setup.model, run.params, {"tokens": tokens}, rng, prob)
  np.testing.assert_allclose(float(generative), float(total / count), rtol=1e-6)
  np.testing.assert_allclose(float(classification), math.log(10), rtol=1e-6)  # a zero classifier: uniform
  visible = model_lib.token_nll(run.setup.model.apply({"params": run.params}, tokens,
                                                      bert_mask=jnp.zeros(tokens.shape, bool)), tokens).mean()
  assert abs(float(generative) - float(visible)) > 1e-3  # what the all-false mask used to train on
  assert cli.main(["pixelgpt", "probe", "--workdir", workdir, "--train_examples", "500"]) == 0
  with open(os.path.join(workdir, "probe.json")) as f:
    assert json.load(f)["test_accuracy"] > 0.3  # 38% measured after 40 steps (chance 10%)
