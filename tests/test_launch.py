"""launch/tpu.py: the gcloud commands each action prints in a dry run, the remote scripts' shell quoting (run by a
local bash), one-line errors, and a real run against a fake gcloud running exactly what the dry run printed.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "launch", "tpu.py")
_spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

V4 = ["--name", "igpt-l", "--zone", "us-central2-b"]
V5E = ["--name", "igpt-xl", "--zone", "us-west4-a", "--slices", "8"]
TRAIN = ["--config", "configs/pod.py:l,v4-2048", "--workdir", "gs://bucket/igpt-l"]
ODD_VALUE = "folder:/data/my images/it's \"here\" $HOME;*"  # spaces, both quotes, a variable, a separator, a glob


def _printed(text):
  """The command lines of a dry run's output, as argument lists."""
  return [shlex.split(line[len(tpu.PREFIX):]) for line in text.splitlines() if line.startswith(tpu.PREFIX)]


def _dry(capsys, *args):
  assert tpu.main([*args, "--dry-run"]) == 0
  return _printed(capsys.readouterr().out)


def _remote_script(command):
  (script,) = [arg.removeprefix("--command=") for arg in command if arg.startswith("--command=")]
  return script


def _cli(*args, path=None):
  env = dict(os.environ, **({"PATH": path} if path else {}))
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("args, expected", [
    (["create", *V4, "--accelerator-type", "v4-2048", "--spot"],
     "gcloud compute tpus tpu-vm create igpt-l --accelerator-type=v4-2048 --version=tpu-ubuntu2204-base --spot "
     "--zone=us-central2-b"),
    (["create", *V4, "--accelerator-type", "v3-2048", "--reserved", "--project", "my-project"],
     "gcloud compute tpus tpu-vm create igpt-l --accelerator-type=v3-2048 --version=tpu-ubuntu2204-base --reserved "
     "--zone=us-central2-b --project=my-project"),
    (["create", *V4, "--accelerator-type", "v5p-2048", "--queued", "--spot"],
     "gcloud compute tpus queued-resources create igpt-l --accelerator-type=v5p-2048 --runtime-version=v2-alpha-tpuv5 "
     "--node-id=igpt-l --spot --zone=us-central2-b"),
    (["create", *V5E, "--accelerator-type", "v5litepod-256", "--reserved"],
     "gcloud compute tpus queued-resources create igpt-xl --accelerator-type=v5litepod-256 "
     "--runtime-version=v2-alpha-tpuv5-lite --node-count=8 --node-prefix=igpt-xl --reserved --zone=us-west4-a"),
    (["create", *V5E, "--accelerator-type", "v5litepod-256", "--best-effort"],
     "gcloud alpha compute tpus queued-resources create igpt-xl --accelerator-type=v5litepod-256 "
     "--runtime-version=v2-alpha-tpuv5-lite --node-count=8 --node-prefix=igpt-xl --best-effort --zone=us-west4-a"),
    (["create", *V4, "--accelerator-type", "v4-2048", "--runtime-version", "v2-alpha-tpuv4"],
     "gcloud compute tpus tpu-vm create igpt-l --accelerator-type=v4-2048 --version=v2-alpha-tpuv4 "
     "--zone=us-central2-b"),
])
def test_create_prints_the_tpu_vm_or_queued_resource_command(capsys, args, expected):
  assert _dry(capsys, *args) == [expected.split()]


def test_logs_stop_delete_commands(capsys):
  assert _dry(capsys, "logs", *V4) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "igpt-l", "--worker=0", "--command=tail -n 100 -F pixelgpt.log",
       "--zone=us-central2-b"]]
  assert _dry(capsys, "logs", *V5E, "--worker", "all")[0][4:8] == ["ssh", "igpt-xl", "--node=all", "--worker=all"]
  assert _dry(capsys, "delete", *V4) == [
      "gcloud compute tpus tpu-vm delete igpt-l --quiet --zone=us-central2-b".split()]
  assert _dry(capsys, "delete", *V5E) == [
      "gcloud compute tpus queued-resources delete igpt-xl --force --quiet --zone=us-west4-a".split()]
  (stop,) = _dry(capsys, "stop", *V5E)
  assert stop[:8] == "gcloud compute tpus queued-resources ssh igpt-xl --node=all --worker=all".split()


def test_install_copies_this_checkout_to_every_worker_and_installs_it(capsys):
  archive, scp, ssh = _dry(capsys, "install", *V4)
  tarball = archive[-2].removeprefix("--output=")
  assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "igpt-l:pixelgpt.tar.gz", "--worker=all",
                 "--zone=us-central2-b"]
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "igpt-l", "--worker=all"]
  steps = [shlex.split(step) for step in _remote_script(ssh).split(" && ")]
  assert steps[:3] == [["rm", "-rf", "pixelgpt"], ["mkdir", "pixelgpt"], ["tar", "-xzf", "pixelgpt.tar.gz", "-C",
                                                                            "pixelgpt"]]
  assert steps[-1][-2:] == ["./pixelgpt[tpu]", "jax[tpu]"]  # quoted, so the brackets reach pip, not the glob


def test_install_from_a_git_url_on_every_slice(capsys):
  (ssh,) = _dry(capsys, "install", *V5E, "--repo", "https://example.com/pixelgpt.git", "--ref", "v1")
  assert ssh[:8] == "gcloud compute tpus queued-resources ssh igpt-xl --node=all --worker=all".split()
  assert shlex.split(_remote_script(ssh).split(" && ")[1]) == [
      "git", "clone", "--depth=1", "--branch", "v1", "https://example.com/pixelgpt.git", "pixelgpt"]


def test_run_script_starts_train_detached_with_overrides_intact_and_stop_matches_it(capsys, tmp_path):
  (ssh,) = _dry(capsys, "run", *V4, *TRAIN, "--config.model.remat=full", f"--config.dataset.name={ODD_VALUE}")
  assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "igpt-l", "--worker=all"]
  # A stand-in worker: its home holds the source and a `pixelgpt` that records how it was called, then trains "forever".
  home, record = tmp_path / "home", tmp_path / "record.json"
  (home / "pixelgpt").mkdir(parents=True)
  fake = home / "pixelgpt-venv" / "bin" / "pixelgpt"
  fake.parent.mkdir(parents=True)
  fake.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                  f"json.dump([sys.argv[1:], os.environ.get('JAX_PLATFORMS'), os.getcwd(), os.getpid()], "
                  f"open({str(record)!r}, 'w'))\ntime.sleep(120)\n")
  fake.chmod(0o755)
  start = time.monotonic()
  subprocess.run(["bash", "-c", _remote_script(ssh)], cwd=home, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                 check=True, timeout=30)
  assert time.monotonic() - start < 10  # ssh would return at once: the job runs in the background
  while not record.exists() or not record.read_text():
    assert time.monotonic() - start < 30
    time.sleep(0.05)
  argv, jax_platforms, cwd, pid = json.loads(record.read_text())
  try:
    assert argv == ["train", "--config", "configs/pod.py:l,v4-2048", "--workdir", "gs://bucket/igpt-l",
                    "--config.model.remat=full", f"--config.dataset.name={ODD_VALUE}"]
    assert jax_platforms is None and cwd == str(home / "pixelgpt")
    assert (home / "pixelgpt.log").exists()
    # `stop` kills by pattern on the workers; here the pattern is only matched, and the job ended by its pid.
    (stop,) = _dry(capsys, "stop", *V4)
    pattern = shlex.split(_remote_script(stop))[2]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      assert re.search(pattern, f.read().replace(b"\0", b" ").decode())
    assert not re.search(pattern, _remote_script(stop))  # the remote shell running pkill survives it
  finally:
    os.kill(pid, 9)


def test_api_gives_the_cli_commands_for_a_sweep_run(capsys):
  cli = _dry(capsys, "up", *V4, "--accelerator-type", "v4-2048", *TRAIN, "--config.model.n_layer=24")
  api = tpu.commands_for("up", name="igpt-l", zone="us-central2-b", accelerator="v4-2048",
                         config=TRAIN[1], workdir=TRAIN[3], overrides={"model.n_layer": 24})
  assert api == cli
  assert [c[3:5] for c in api] == [["tpu-vm", "create"], ["archive", "--format=tar.gz"], ["tpu-vm", "scp"],
                                   ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
  with pytest.raises(tpu.LaunchError, match="takes no"):
    tpu.commands_for("delete", name="a", zone="z", config="c.py")


@pytest.mark.parametrize("args, message", [
    (["create", *V4, "--accelerator-type", "v5e-256"], "unknown accelerator type 'v5e-256'"),
    (["create", "--zone", "z", "--accelerator-type", "v4-8"], "--name is required"),
    (["delete", "--name", "Bad_Name", "--zone", "z"], "--name 'Bad_Name'"),
    (["delete", "--name", "a"], "--zone is required"),
    (["create", *V4, "--accelerator-type", "v3-2048", "--slices", "2"], "multislice needs TPU v4 or later"),
    (["create", *V4, "--accelerator-type", "v4-8", "--best-effort"], "--best-effort needs a queued resource"),
    (["create", *V4, "--accelerator-type", "v4-8", "--spot", "--reserved"], "not allowed with argument"),
    (["run", *V4, "--config", "c.py", "--workdir", "/local/dir"], "a gs:// path is required"),
    (["run", *V4, "--workdir", "gs://b/r"], "--config is required"),
    (["run", *V4, *TRAIN, "--config.model.remat", "full"], "--config.key=value"),
    (["reboot", *V4], "invalid choice: 'reboot'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
  assert tpu.main([*args, "--dry-run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert len(captured.err.splitlines()) == 1 and message in captured.err


def test_without_gcloud_a_real_run_is_one_line_and_exit_2(tmp_path):
  proc = _cli("delete", *V4, path=str(tmp_path))
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and "gcloud not found on PATH" in proc.stderr


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` first on PATH that appends its arguments to a file; `describe` prints $FAKE_STATE (ACTIVE)."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
      f"#!{sys.executable}\nimport json, os, sys\n"
      f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
      "if 'describe' in sys.argv: print(os.environ.get('FAKE_STATE', 'ACTIVE'))\n"
      "if os.environ.get('FAKE_FAIL') in sys.argv: sys.exit('ERROR: (gcloud.compute.tpus) it went wrong')\n")
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


UP_V5E = ["up", *V5E, "--accelerator-type", "v5litepod-256", "--spot", "--repo", "https://example.com/p.git",
          *TRAIN, f"--config.dataset.name={ODD_VALUE}"]


def test_real_run_runs_exactly_what_the_dry_run_printed(fake_gcloud):
  dry = _cli(*UP_V5E, "--dry-run")
  assert dry.returncode == 0 and fake_gcloud() == []
  printed = _printed(dry.stdout)
  assert [c[3:6] for c in printed] == [["queued-resources", "create", "igpt-xl"],
                                       ["queued-resources", "describe", "igpt-xl"],
                                       ["queued-resources", "ssh", "igpt-xl"], ["queued-resources", "ssh", "igpt-xl"]]
  real = _cli(*UP_V5E)
  assert real.returncode == 0, real.stderr
  assert [["gcloud", *argv] for argv in fake_gcloud()] == printed
  assert _printed(real.stderr) == printed  # echoed as it goes


def test_a_failing_gcloud_stops_the_launch_with_its_message_and_status(fake_gcloud, monkeypatch):
  monkeypatch.setenv("FAKE_FAIL", "create")
  proc = _cli(*UP_V5E)
  assert proc.returncode == 1 and len(fake_gcloud()) == 1  # nothing after the failed create
  assert "ERROR: (gcloud.compute.tpus) it went wrong" in proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("launch/tpu.py: error: gcloud compute tpus queued-resources create")
  monkeypatch.setenv("FAKE_FAIL", "")
  monkeypatch.setenv("FAKE_STATE", "FAILED")
  proc = _cli(*UP_V5E)
  assert proc.returncode == 1 and "FAILED, so it will never be ACTIVE" in proc.stderr


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, ".git")), reason="installs from a git checkout")
def test_real_install_sends_a_source_tarball_of_this_checkout(fake_gcloud, tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  proc = _cli("install", *V4)
  assert proc.returncode == 0, proc.stderr
  scp, _ = fake_gcloud()
  with tarfile.open(scp[4]) as tar:
    assert {"setup.py", "pixelgpt/cli.py", "configs/smoke.py"} <= set(tar.getnames())
