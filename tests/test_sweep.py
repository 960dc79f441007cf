"""pixelgpt sweep: grid expansion and run names, a local sweep end to end that resumes an interrupted run and does
no work when rerun, the TPU launcher's dry run, the scaling-law fit on known data, one-line errors for bad sweeps.
"""

import csv
import json
import os
import pathlib
import shlex

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from pixelgpt import cli
from pixelgpt import config as config_lib
from pixelgpt import sweep
from pixelgpt import train
from tests.conftest import REPO

cli.COMMANDS.setdefault("sweep", "pixelgpt.sweep")

# Three 2-layer models on the embedded digits, a few steps each: the whole local sweep trains in seconds.
TINY_SWEEP = """
from pixelgpt import config as config_lib

def get_sweep():
  base = config_lib.override(config_lib.base(), {
      "total_steps": 3, "log_every": 3, "eval_every": 0, "checkpoint_every": 0, "batch_size": 16,
      "palette.fit_pixels": 5000, "optim.warmup_steps": 1, "model.n_layer": 2, "model.n_head": 2})
  return {"base": base, "zip": {"model.d_model": [8, 16, 32]}}
"""


def _sweep(capsys, *args):
  code = cli.main(["pixelgpt", "sweep", *args])
  out, err = capsys.readouterr()
  return code, out, err


def _workdir_states(runs):
  """Each run's metrics and checkpoint steps: training anything would change them."""
  return {r.name: (pathlib.Path(r.workdir, "metrics.jsonl").read_text(),
                   sorted(os.listdir(os.path.join(r.workdir, "checkpoints")))) for r in runs}


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_grid_crosses_every_product_point_with_every_zip_row_and_names_runs_after_their_overrides():
  base = config_lib.base()
  spec = {"base": base, "product": {"model.d_model": [32, 64], "optim.lr": [1e-3]},
          "zip": {"model.n_layer": [1, 2], "model.n_head": [2, 4]}}
  runs = sweep.expand(spec, "/r")
  assert [r.name for r in runs] == ["d_model=32-lr=0.001-n_layer=1-n_head=2", "d_model=32-lr=0.001-n_layer=2-n_head=4",
                                    "d_model=64-lr=0.001-n_layer=1-n_head=2", "d_model=64-lr=0.001-n_layer=2-n_head=4"]
  assert [(r.config.model.d_model, r.config.model.n_layer, r.config.model.n_head) for r in runs] == [
      (32, 1, 2), (32, 2, 4), (64, 1, 2), (64, 2, 4)]
  assert runs[0].workdir == os.path.join("/r", runs[0].name) and runs[0].config.optim.lr == 1e-3
  assert base.model.d_model == 128  # the base is not modified
  assert sweep.expand({"base": base}, "/r")[0].name == "base"
  # Keys sharing a last part are named in full; values become safe path components.
  assert sweep.run_name({"optim.b1": 0.9, "model.b1": 3e-5}) == "optim.b1=0.9-model.b1=3e-05"
  assert sweep.run_name({"dataset.name": "folder:/data/my images", "model.remat": True}) == \
      "name=folder__data_my_images-remat=true"


def test_local_sweep_resumes_an_interrupted_run_writes_results_and_plots_and_a_rerun_does_no_work(tmp_path, capsys):
  path = _write(tmp_path / "tiny.py", TINY_SWEEP)
  root = tmp_path / "results"
  runs = sweep.expand(sweep.load_sweep(path), str(root / "runs"))
  train.run(runs[1].config, runs[1].workdir, stop_after=1)  # as if the sweep had been stopped in its second run
  capsys.readouterr()

  code, out, _ = _sweep(capsys, "--sweep", path, "--root", str(root))
  assert code == 0
  assert f"{runs[1].name}: training from step 1" in out
  assert all(f"{r.name}: training from scratch" in out for r in (runs[0], runs[2]))
  with open(root / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == [r.name for r in runs] and all(r["finished"] == "True" for r in rows)
  for row, run in zip(rows, runs):
    non_embedding, total = sweep.param_counts(run.config)
    assert (int(row["params_non_embedding"]), int(row["params_total"])) == (non_embedding, total)
    assert int(row["tokens"]) == 3 * 16 * 64 and float(row["wall_s"]) > 0
    assert 0 < float(row["eval_loss"]) < np.log(16) + 0.1
  assert [int(r["params_non_embedding"]) for r in rows] == sorted(int(r["params_non_embedding"]) for r in rows)
  assert float(rows[0]["train_flops"]) < float(rows[1]["train_flops"]) < float(rows[2]["train_flops"])
  for plot in ("loss_vs_params.png", "loss_vs_compute.png"):
    assert (root / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert out.count("pixelgpt sweep: loss vs ") == 2
  assert "| " + runs[2].name in (root / "results.md").read_text()

  # A probe result in a workdir is collected; the rerun trains nothing and leaves every workdir as it was.
  (root / "runs" / runs[0].name / "probe.json").write_text(json.dumps({"test_accuracy": 0.5}))
  before = _workdir_states(runs)
  code, out, _ = _sweep(capsys, "--sweep", path, "--root", str(root))
  assert code == 0
  assert out.count(": finished, skipped") == 3 and "training from" not in out
  assert _workdir_states(runs) == before
  with open(root / "results.csv") as f:
    assert [r["probe_accuracy"] for r in csv.DictReader(f)] == ["0.5", "", ""]


def test_tpu_dry_run_prints_the_launch_commands_of_every_run_whose_workers_rebuild_its_config(tmp_path, capsys):
  sweep_file = "configs/sweeps/igpt_family.py"
  code, out, _ = _sweep(capsys, "--sweep", os.path.join(REPO, sweep_file), "--root", str(tmp_path / "r"),
                        "--launcher", "tpu", "--dry_run", "--workdir_root", "gs://bucket/family",
                        "--zone", "us-central2-b", "--accelerator_type", "v4-256", "--capacity", "spot")
  assert code == 0 and not (tmp_path / "r").exists()
  commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
  runs = sweep.expand(sweep.load_sweep(os.path.join(REPO, sweep_file)), "gs://bucket/family")
  assert len(runs) == 3
  for run in runs:
    name = sweep.tpu_name(sweep_file, run)
    creates = [c for c in commands if c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", name]]
    assert len(creates) == 1 and "--accelerator-type=v4-256" in creates[0] and "--spot" in creates[0]
    (start,) = [c for c in commands if name in c and any("pixelgpt train" in a for a in c)]
    spec = f"pixelgpt/sweep.py:{sweep_file}:{run.name}"
    script = next(a for a in start if a.startswith("--command="))
    assert shlex.quote(spec) in script and f"--workdir gs://bucket/family/{run.name}" in script

    # What a worker does with that --config: ml_collections calls sweep.get_config with the part after the colon.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    cwd = os.getcwd()
    try:
      os.chdir(REPO)
      fv(["pixelgpt", "--config", spec])
    finally:
      os.chdir(cwd)
    assert config_lib.to_json(fv.config) == config_lib.to_json(run.config)
  assert len({sweep.tpu_name(sweep_file, r) for r in runs}) == 3
  code, _, err = _sweep(capsys, "--sweep", os.path.join(REPO, sweep_file), "--root", str(tmp_path / "r"),
                        "--launcher", "tpu", "--workdir_root", "gs://bucket/family")
  assert code == 2 and err.strip().splitlines() == ["pixelgpt sweep: error: --zone is required (e.g. us-central2-b)"]


def test_power_law_fit_recovers_known_exponent_irreducible_loss_and_scale():
  rng = np.random.default_rng(0)
  x = np.geomspace(1e4, 1e8, 9)
  for e, a, alpha in [(1.2, 30.0, 0.35), (0.4, 8.0, 0.12), (2.0, 1e3, 0.7)]:
    loss = (e + a * x ** -alpha) * np.exp(rng.normal(0, 0.003, len(x)))
    fit = sweep.fit_power_law(x, loss)
    assert abs(fit["alpha"] - alpha) < 0.03 and abs(fit["E"] - e) < 0.05 and abs(np.log(fit["A"] / a)) < 0.3
    assert 0 < fit["alpha_se"] < 0.05 and abs(fit["alpha"] - alpha) < 4 * fit["alpha_se"]
  exact = sweep.fit_power_law(x[:3], 1.2 + 30 * x[:3] ** -0.35)  # as many points as parameters: no error estimate
  assert abs(exact["alpha"] - 0.35) < 1e-4 and exact["alpha_se"] == np.inf
  with pytest.raises(ValueError, match="at least 3"):
    sweep.fit_power_law(x[:2], [2.0, 1.9])


@pytest.mark.parametrize("text, args, message", [
    ('{"base": B, "zip": {"model.n_layer": [1, 2], "model.n_head": [2]}}', [], "equal lengths"),
    ('{"base": B, "product": {"model.d_modle": [32]}}', [], "'model.d_modle' is not a config key"),
    ('{"base": B, "product": {"model.n_head": [3]}}', [], "run n_head=3: config.model.d_model (128) must be divisible"),
    ('{"base": B, "product": {"model.n_layer": ["two"]}}', [], "run n_layer=two"),
    ('{"base": B, "grid": {}}', [], "unknown sweep keys ['grid']"),
    ('{"base": B, "product": {"model.n_layer": [1, 1]}}', [], "names two runs alike"),
    ("1 / 0", [], "ZeroDivisionError"),
    ('{"base": B}', ["--launcher", "tpu"], "needs --workdir_root gs://"),
    ('{"base": B}', ["--launcher", "tpu", "--workdir_root", "gs://b/r"], "must be inside the checkout"),
])
def test_a_bad_sweep_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, text, args, message):
  source = f"from pixelgpt import config\nB = config.base()\ndef get_sweep():\n  return {text}\n"
  path = _write(tmp_path / "bad.py", source)
  code, out, err = _sweep(capsys, "--sweep", path, "--root", str(tmp_path / "r"), *args)
  assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
  assert "training from" not in out and not (tmp_path / "r").exists()
