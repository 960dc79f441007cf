"""Every mistake a user can make ends in one line on stderr and exit status 2, before any work, no traceback."""

import pytest

from tests.conftest import run_pixelgpt


@pytest.mark.parametrize("flags,message", [
    (["--config.no_such_key=1"], "unknown config key 'no_such_key' (the top level has batch_size"),
    (["--config.model.n_layers=2"], "unknown config key 'model.n_layers' (group 'model' has attention"),
    (["--config.modle.n_layer=2"], "there is no group 'modle'); closest: model.n_layer"),
    (["--config.palette=2"], "--config.palette is a group, not a key: set one of palette.fit_pixels"),
    (["--config.batch_size=-4"], "config.batch_size must be a positive integer"),
    (["--config.batch_size=abc"], "batch_size"),
    (["--config.mesh.fsdp=3"], "does not match"),
    (["--config.batch_size=30", "--config.mesh.fsdp=4"], "not divisible"),
    (["--config.mesh.axis_order=data,fsdp"], "config.mesh.axis_order='data,fsdp' must name each of"),
    (["--config.dataset.name=mnist_typo"], "mnist_typo"),
    (["--config.dataset.name=fashion_mnist", "--config.dataset.data_dir=/nonexistent"], "/nonexistent"),
], ids=["unknown-key", "unknown-key-in-group", "unknown-group", "group-not-key", "negative-batch", "wrong-type",
        "mesh", "batch-divisibility", "axis-order", "dataset", "data-dir"])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, flags, message):
  proc = run_pixelgpt("train", "--config", "configs/smoke.py", "--workdir", tmp_path / "w", *flags, devices=4,
                      check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config,message", [
    ("configs/no_such_config.py", "config file configs/no_such_config.py not found"),
    ("configs/no_such_config.py:xl", "config file configs/no_such_config.py not found"),
    ("configs/smoke.py:xl", "get_config() takes 0 positional arguments but 1 was given"),
    ("configs/pod.py:xxl,v4-2048", "configs/pod.py takes MODEL,TOPOLOGY with MODEL one of l, l48, xl"),
    ("configs/pod.py:xl,v9-2048", "unknown TPU topology 'v9-2048'"),
], ids=["missing-file", "missing-file-with-argument", "argument-not-taken", "pod-model", "pod-topology"])
def test_a_config_file_that_does_not_load_is_one_line_and_exit_2(tmp_path, config, message):
  proc = run_pixelgpt("train", "--config", config, "--workdir", tmp_path / "w", check=False)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
