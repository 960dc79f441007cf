"""Test setup: 8 virtual CPU devices (the CPU fallback mesh), the repo's config files, and `pixelgpt` as a real
subprocess (for signals, exit codes and multi-process runs)."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from pixelgpt import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_DEVICES = 8

# Before any backend starts: tests shard over N virtual CPU devices, exactly as a TPU run shards over chips.
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", CPU_DEVICES)


def load_config(name: str, **overrides):
  """configs/<name>.py's get_config(), with dotted-key overrides as `--config.a.b=v` would give."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.override(module.get_config(), overrides)


def pixelgpt_argv(*args, devices: int = 1) -> list[str]:
  return [sys.executable, "-m", "pixelgpt", *map(str, args), f"--cpu_devices={devices}"]


def run_pixelgpt(*args, devices: int = 1, check: bool = True, env: dict | None = None,
                 cwd: str = REPO) -> subprocess.CompletedProcess:
  """`pixelgpt ARGS` in `cwd` (the repo) on `devices` virtual CPU devices, with `env` added to the environment;
  stdout and stderr captured apart."""
  proc = subprocess.run(pixelgpt_argv(*args, devices=devices), cwd=cwd,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), capture_output=True, text=True,
                        timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def start_pixelgpt(*args, devices: int = 1, env: dict | None = None, cwd: str = REPO) -> subprocess.Popen:
  """`pixelgpt ARGS` in the background, stdout and stderr merged, for tests that signal or join it."""
  return subprocess.Popen(pixelgpt_argv(*args, devices=devices), cwd=cwd,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def gcs():
  """A real Cloud Storage JSON API (fake-gcs-server) on localhost for the whole session, with bucket `bucket`."""
  from tests.gcs_server import LocalGcs  # pylint: disable=g-import-not-at-top
  server = LocalGcs()
  server.create_bucket("bucket")
  yield server
  server.stop()
