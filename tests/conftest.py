"""Test setup: 8 virtual CPU devices (the CPU fallback mesh), the repo's config files, and `pixelgpt` as a real
subprocess (for signals, exit codes and multi-process runs)."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_job(*args, processes: int, devices: int, logs, env: dict | None = None,
              cwd: str = REPO) -> list[subprocess.Popen]:
  """`pixelgpt ARGS` as a multi-process job on localhost (gloo), `devices` CPU devices per process, each
  process's output in its own log file under `logs` (never a pipe, which could fill up and stall one of them)."""
  address = f"localhost:{_free_port()}"
  procs = []
  for i in range(processes):
    log = tempfile.NamedTemporaryFile("w+", dir=logs, prefix=f"process{i}-", suffix=".log", delete=False)
    procs.append(subprocess.Popen(
        pixelgpt_argv(*args, f"--coordinator_address={address}", f"--num_processes={processes}",
                      f"--process_id={i}", devices=devices), cwd=cwd,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), stdout=log, stderr=subprocess.STDOUT, text=True))
    procs[-1].log = log
  return procs


def job_outputs(procs) -> list[str]:
  """What each process printed, for processes started by start_job (others: what their pipe still holds)."""
  return [open(p.log.name).read() if hasattr(p, "log") else (p.stdout.read() if p.stdout else "") for p in procs]


def finish_job(procs, timeout: float = 600) -> str:
  """Waits for every process to exit 0; returns process 0's output."""
  for p in procs:
    p.wait(timeout=timeout)
  outputs = job_outputs(procs)
  assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outputs)
  return outputs[0]


def kill_job(procs) -> None:
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()


def wait_for(predicate, procs, timeout: float = 240.0, poll: float = 0.005) -> bool:
  """True once predicate() holds; False if a process ended first; a timeout kills the job and shows its output."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if any(p.poll() is not None for p in procs):
      return False
    time.sleep(poll)
  kill_job(procs)
  raise TimeoutError("\n".join(f"process {i}:\n{o[-3000:]}" for i, o in enumerate(job_outputs(procs))))


@pytest.fixture(scope="session")
def gcs():
  """A real Cloud Storage JSON API (fake-gcs-server) on localhost for the whole session, with bucket `bucket`."""
  from tests.gcs_server import LocalGcs  # pylint: disable=g-import-not-at-top
  server = LocalGcs()
  server.create_bucket("bucket")
  yield server
  server.stop()
