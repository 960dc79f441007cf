"""Cloud TPU launcher: create a TPU VM or queued resource (one or many slices), install pixelgpt on every worker,
train on all of them at once, follow the logs, stop, delete. Standard library only; `--dry-run` prints every command.

As a script: `python launch/tpu.py <action> --name N --zone Z ... [--dry-run]` (actions: create, wait, install,
run, logs, stop, delete, up = create + wait + install + run); `python launch/tpu.py <action> -h` lists the flags.
As a module (what `pixelgpt sweep --launcher tpu` uses): `execute(commands_for("up", name=..., zone=...,
accelerator="v4-2048", config=..., workdir="gs://...", overrides={"model.n_layer": 24}), dry_run=True)`.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "+ "  # starts every command line a dry run prints (and a real run echoes to stderr), as `bash -x` does

# TPU software ("runtime") version per generation, as https://cloud.google.com/tpu/docs/runtimes lists them for JAX.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v6e": "v2-alpha-tpuv6e",
}
MULTISLICE_GENERATIONS = ("v4", "v5p", "v5litepod", "v6e")  # Cloud TPU Multislice starts at v4
CAPACITIES = ("spot", "reserved", "best-effort")  # none of them: on-demand quota
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # what Compute Engine accepts as a resource name

# On every worker, relative to the home directory where `ssh --command` starts.
SOURCE_DIR = "pixelgpt"
VENV_DIR = "pixelgpt-venv"
LOG_FILE = "pixelgpt.log"
TARBALL = "pixelgpt.tar.gz"
UV = ".local/bin/uv"
# The TPU images are Ubuntu 22.04 with Python 3.10, older than pixelgpt needs; uv fetches the version CI tests.
PYTHON = "3.11"

# A queued resource is usable once this query prints ACTIVE; `execute` repeats it until then instead of running once.
STATE_QUERY = "--format=value(state.state)"
POLL_S = 30
STATES_THAT_NEVER_BECOME_ACTIVE = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


class LaunchError(Exception):
  """A launch that cannot go on: `main` prints the message as one line and exits with `exit_code`."""

  def __init__(self, message: str, exit_code: int = 2):
    super().__init__(message)
    self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
  """Bad flags raise LaunchError, so they end as one line, not argparse's usage dump."""

  def error(self, message):
    raise LaunchError(message)


def _parser() -> argparse.ArgumentParser:
  """The command line; its defaults are also the Python API's, so the two cannot drift."""
  common = _Parser(add_help=False)
  common.add_argument("--name", help="TPU VM or queued resource: lowercase letters, digits, hyphens")
  common.add_argument("--zone", help="one that offers the accelerator type, e.g. us-central2-b for v4")
  common.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  common.add_argument("--queued", action="store_true", help="a queued resource rather than a TPU VM")
  common.add_argument("--slices", type=int, default=1,
                      help="slices joined over the data-center network; more than 1 implies --queued")
  common.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
  create = _Parser(add_help=False)
  create.add_argument("--accelerator-type", dest="accelerator", metavar="TYPE",
                      help="per slice: v3-2048, v4-2048, v5p-2048, v5litepod-256 (v5e), v6e-256, ...")
  create.add_argument("--runtime-version", help="default: the one Cloud TPU recommends for the generation")
  capacity = create.add_mutually_exclusive_group()
  for kind, summary in zip(CAPACITIES, ("preemptible, cheaper", "from your reservation", "queued resources only")):
    capacity.add_argument(f"--{kind}", dest="capacity", action="store_const", const=kind, help=summary)
  install = _Parser(add_help=False)
  install.add_argument("--repo", help="git URL the workers clone (default: copy this checkout's --ref)")
  install.add_argument("--ref", default="HEAD", help="commit, branch or tag (with --repo: a branch or tag)")
  train = _Parser(add_help=False)
  train.add_argument("--config", help="config file relative to the repository root, e.g. configs/pod.py:l,v4-2048; "
                                      "--config.key=value flags override it, as with `pixelgpt train`")
  train.add_argument("--workdir", help="gs://bucket/path: every worker writes the same checkpoints")
  logs = _Parser(add_help=False)
  logs.add_argument("--worker", default="0", help="worker index, or 'all' (every worker of every slice)")

  parser = _Parser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
  actions = parser.add_subparsers(dest="action", required=True, metavar="action")
  for action, parents, summary in (
      ("create", [create], "create the TPU VM, or queue the resource (--queued, --slices N)"),
      ("wait", [], "wait until a queued resource is ACTIVE"),
      ("install", [install], "install pixelgpt on every worker"),
      ("run", [train], "start `pixelgpt train` on every worker, in the background"),
      ("logs", [logs], "follow the training log"),
      ("stop", [], "stop the training job on every worker"),
      ("delete", [], "delete the TPU VM or queued resource"),
      ("up", [create, install, train], "create + wait + install + run"),
  ):
    actions.add_parser(action, parents=[common, *parents], help=summary, description=summary, allow_abbrev=False)
  return parser


def _generation(accelerator: str) -> str:
  generation, _, size = accelerator.rpartition("-")
  if generation not in RUNTIME_VERSIONS or not size.isdigit() or int(size) < 1:
    raise LaunchError(f"unknown accelerator type {accelerator!r}: expected GENERATION-SIZE with GENERATION one of "
                      f"{', '.join(RUNTIME_VERSIONS)} (v5e is v5litepod), e.g. v4-2048")
  return generation


def _resolve(action: str, options: dict) -> argparse.Namespace:
  """`options` over the command line's defaults for `action`, checked: any mistake raises LaunchError."""
  if action not in _ACTIONS:
    raise LaunchError(f"unknown action {action!r} (actions: {', '.join(_ACTIONS)})")
  defaults = vars(_parser().parse_args([action]))
  del defaults["action"], defaults["dry_run"]
  takes_config = "config" in defaults
  if takes_config:
    defaults["overrides"] = {}
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise LaunchError(f"{action} takes no {', '.join(unknown)}")
  o = argparse.Namespace(**{**defaults, **options})

  if not o.name:
    raise LaunchError("--name is required")
  if not NAME.fullmatch(o.name):
    raise LaunchError(f"--name {o.name!r}: at most 63 lowercase letters, digits and hyphens, starting with a letter")
  if not o.zone:
    raise LaunchError("--zone is required (e.g. us-central2-b)")
  if o.slices < 1:
    raise LaunchError(f"--slices {o.slices}: must be at least 1")
  o.queued = o.queued or o.slices > 1
  if "accelerator" in defaults:
    if not o.accelerator:
      raise LaunchError("--accelerator-type is required (e.g. v4-2048, v5litepod-256)")
    generation = _generation(o.accelerator)
    o.runtime_version = o.runtime_version or RUNTIME_VERSIONS[generation]
    if o.slices > 1 and generation not in MULTISLICE_GENERATIONS:
      raise LaunchError(f"--slices {o.slices}: multislice needs TPU v4 or later, not {o.accelerator}")
    if o.capacity not in (None, *CAPACITIES):
      raise LaunchError(f"capacity {o.capacity!r}: one of {', '.join(CAPACITIES)}, or none for on-demand")
    if o.capacity == "best-effort" and not o.queued:
      raise LaunchError("--best-effort needs a queued resource (--queued or --slices N)")
  if takes_config:
    if not o.config:
      raise LaunchError("--config is required (e.g. configs/pod.py:l,v4-2048)")
    if not (o.workdir or "").startswith("gs://"):
      raise LaunchError(f"--workdir {o.workdir!r}: a gs:// path is required, so that all workers share one run"
                        if o.workdir else "--workdir gs://BUCKET/PATH is required")
    for key in o.overrides:
      if not key or "=" in key or any(c.isspace() for c in key):
        raise LaunchError(f"config override key {key!r}: expected a dotted key such as model.remat")
  if "worker" in defaults and not (o.worker == "all" or str(o.worker).isdigit()):
    raise LaunchError(f"--worker {o.worker!r}: a worker index or 'all'")
  return o


def _gcloud(o, verb: str, *args: str, track: tuple = ()) -> list:
  group = "queued-resources" if o.queued else "tpu-vm"
  project = [f"--project={o.project}"] if o.project else []
  return ["gcloud", *track, "compute", "tpus", group, verb, *args, f"--zone={o.zone}", *project]


def _workers(o, worker="all") -> list:
  """Flags that select `worker` on each slice: 'all' is every worker of every slice, an index is on slice 0."""
  node = [f"--node={'all' if worker == 'all' else 0}"] if o.queued else []
  return [*node, f"--worker={worker}"]


def _on_workers(o, script: str, worker="all") -> list:
  return _gcloud(o, "ssh", o.name, *_workers(o, worker), f"--command={script}")


def _shell(steps: list) -> str:
  """Argument lists as one remote shell line that stops at the first failing step; every word shell-quoted."""
  return " && ".join(map(shlex.join, steps))


def _create(o) -> list:
  capacity = [f"--{o.capacity}"] if o.capacity else []
  if not o.queued:  # returns once the TPU VM is READY
    return [_gcloud(o, "create", o.name, f"--accelerator-type={o.accelerator}", f"--version={o.runtime_version}",
                    *capacity)]
  # One slice is node NAME; N slices are nodes NAME-0 ... NAME-(N-1), and Cloud TPU gives every worker the
  # MEGASCALE_* settings that join them, which libtpu reads: nothing to set here.
  nodes = [f"--node-id={o.name}"] if o.slices == 1 else [f"--node-count={o.slices}", f"--node-prefix={o.name}"]
  track = ("alpha",) if o.capacity == "best-effort" else ()  # gcloud has --best-effort only in its alpha track
  return [_gcloud(o, "create", o.name, f"--accelerator-type={o.accelerator}", f"--runtime-version={o.runtime_version}",
                  *nodes, *capacity, track=track)]


def _wait(o) -> list:
  return [_gcloud(o, "describe", o.name, STATE_QUERY)] if o.queued else []


def _install(o) -> list:
  if o.repo:
    local = []
    fetch = [["rm", "-rf", SOURCE_DIR],
             ["git", "clone", "--depth=1", *(["--branch", o.ref] if o.ref != "HEAD" else []), o.repo, SOURCE_DIR]]
  else:
    # A file named after the TPU, so that runs launched side by side (a sweep) do not overwrite each other's.
    tarball = os.path.join(tempfile.gettempdir(), f"pixelgpt-{o.name}.tar.gz")
    local = [["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", o.ref],
             _gcloud(o, "scp", tarball, f"{o.name}:{TARBALL}", *_workers(o))]
    fetch = [["rm", "-rf", SOURCE_DIR], ["mkdir", SOURCE_DIR], ["tar", "-xzf", TARBALL, "-C", SOURCE_DIR]]
  setup = [["python3", "-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"],
           [UV, "venv", "--allow-existing", "--python", PYTHON, VENV_DIR],
           # jax[tpu] pins the libtpu that matches jax; the `tpu` extra alone would take the newest libtpu.
           [UV, "pip", "install", "--python", f"{VENV_DIR}/bin/python", f"./{SOURCE_DIR}[tpu]", "jax[tpu]"]]
  return local + [_on_workers(o, _shell(fetch + setup))]


def _run(o) -> list:
  # JAX_PLATFORMS=cpu left in a login profile would silently train on the host CPUs instead of the TPU.
  train = ["env", "-u", "JAX_PLATFORMS", f"../{VENV_DIR}/bin/pixelgpt", "train", "--config", o.config,
           "--workdir", o.workdir, *(f"--config.{key}={value}" for key, value in o.overrides.items())]
  # Only nohup's process goes to the background, holding none of ssh's streams, so ssh returns at once and the job
  # outlives it; the log is appended to, so a restarted (resumed) run keeps the history of the earlier attempts.
  return [_on_workers(o, f"cd {SOURCE_DIR} && {{ nohup {shlex.join(train)} >> ../{LOG_FILE} 2>&1 < /dev/null & }}")]


def _logs(o) -> list:
  return [_on_workers(o, f"tail -n 100 -F {LOG_FILE}", worker=o.worker)]


def _stop(o) -> list:
  # The bracket keeps the pattern from matching the remote shell whose command line holds this very pattern.
  pattern = f"[{VENV_DIR[0]}]{VENV_DIR[1:]}/bin/pixelgpt train"
  return [_on_workers(o, f"pkill -f {shlex.quote(pattern)} || true")]


def _delete(o) -> list:
  force = ["--force"] if o.queued else []  # deletes the queued resource's TPUs with it, even while ACTIVE
  return [_gcloud(o, "delete", o.name, *force, "--quiet")]


def _up(o) -> list:
  return _create(o) + _wait(o) + _install(o) + _run(o)


_ACTIONS = {"create": _create, "wait": _wait, "install": _install, "run": _run, "logs": _logs, "stop": _stop,
            "delete": _delete, "up": _up}


def commands_for(action: str, **options) -> list:
  """The commands that carry out `action`, in order, each an argument list.

  Args:
    action: create, wait, install, run, logs, stop, delete or up.
    **options: the command line's flags by their Python names: name, zone, project, queued, slices, accelerator,
      runtime_version, capacity ('spot' | 'reserved' | 'best-effort' | None), repo, ref, config, workdir, worker, and
      overrides: {dotted config key: value}, passed on as --config.key=value. Unset ones take the flags' defaults.

  Returns:
    list[list[str]]; `execute` prints or runs them.

  Raises:
    LaunchError: an unknown action or option, a missing or malformed value.
  """
  return _ACTIONS[action](_resolve(action, options))


def _poll_until_active(command: list) -> None:
  while True:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      sys.stderr.write(result.stderr)
      raise LaunchError(f"{' '.join(command[:6])} failed (exit {result.returncode})", result.returncode)
    state = result.stdout.strip()
    if state == "ACTIVE":
      return
    if state in STATES_THAT_NEVER_BECOME_ACTIVE:
      raise LaunchError(f"{' '.join(command[:6])}: {state}, so it will never be ACTIVE", exit_code=1)
    print(f"# {state or 'no state yet'}; asking again in {POLL_S} s", file=sys.stderr, flush=True)
    time.sleep(POLL_S)


def execute(commands: list, dry_run: bool = False) -> None:
  """Prints `commands` (dry run), or runs them one after another, stopping at the first that fails.

  A dry run prints each command as one line, PREFIX + shlex.join(command), to stdout. A real run echoes the same
  lines to stderr as it goes; the commands' own output passes through.

  Raises:
    LaunchError: a program is missing (exit_code 2), or a command failed (exit_code: its exit status).
  """
  if dry_run:
    for command in commands:
      if STATE_QUERY in command:
        print(f"# repeated every {POLL_S} s until it prints ACTIVE:")
      print(PREFIX + shlex.join(command), flush=True)
    return
  for program in dict.fromkeys(command[0] for command in commands):
    if shutil.which(program) is None:
      hint = ": install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" if program == "gcloud" else ""
      raise LaunchError(f"{program} not found on PATH{hint}; --dry-run prints the commands without it")
  for command in commands:
    print(PREFIX + shlex.join(command), file=sys.stderr, flush=True)
    if STATE_QUERY in command:
      _poll_until_active(command)
      continue
    returncode = subprocess.run(command, check=False).returncode
    if returncode:
      raise LaunchError(f"{' '.join(command[:6])} failed (exit {returncode})", returncode)


def _overrides(args: list) -> dict:
  """The arguments argparse did not know: each must be a --config.key=value override, as `pixelgpt train` takes."""
  overrides = {}
  for arg in args:
    key, equals, value = arg.removeprefix("--config.").partition("=")
    if not arg.startswith("--config.") or not equals:
      raise LaunchError(f"unrecognized argument {arg!r} (config overrides take the form --config.key=value)")
    overrides[key] = value
  return overrides


def main(argv=None) -> int:
  """`python launch/tpu.py ACTION ...`: 0 on success, 2 for bad input or no gcloud, else the failed command's status."""
  try:
    namespace, unknown = _parser().parse_known_args(argv)
    options = vars(namespace)
    action, dry_run = options.pop("action"), options.pop("dry_run")
    if unknown:
      options["overrides"] = _overrides(unknown)
    execute(commands_for(action, **options), dry_run=dry_run)
  except LaunchError as e:
    print(f"launch/tpu.py: error: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # `logs` follows until Ctrl-C
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
