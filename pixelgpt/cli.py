"""`pixelgpt <command>`: parses absl flags and ml_collections config files, then dispatches.

Every mistake a user can make (bad flag, unknown config key, impossible value, mesh or batch that does not fit
the devices, missing data) ends here as one line on stderr and exit status 2.
"""

import difflib
import importlib
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from pixelgpt.errors import Diverged, StorageError, UserError

# When this process started, near enough (the console script imports this module first): where a training
# session's goodput clock starts, so that imports and backend start-up count as its setup.
STARTED = time.time()

USAGE = """usage: pixelgpt <command> [flags]

commands:
  train     --config configs/X.py --workdir W [--config.key=value ...]   pretrain (or resume) a model
  eval      --workdir W                          held-out NLL in nats/token and bits/token
  sample    --workdir W [--out F.png --num 16 --temperature 1 --top_k 0 --seed 0] [--complete --keep_rows R]
  score     --workdir W --tokens IN.npy --out OUT.npz   logits [N,T,K] and nll [N] of given tokens
  probe     --workdir W [--layers 1,2 --val_fraction 0.1 --feature_memory_gib 4]   linear probe per layer, layer
                                                 and L2 chosen on validation -> W/probe.json, W/probe.png
  finetune  --workdir W --out W2 [--steps 500]   fine-tune with L_gen + L_clf, report test accuracy
  compile   --config configs/X.py --topology v3-2048 [--num_slices N] [--json]   AOT compile for a TPU pod: fit,
                                                 feeding, estimated step time (compute/HBM/ICI/DCN)
  plan      --config configs/X.py --topology v5p-2048 [--num_slices N] [--batch_sizes 128-1024] [--remat ...]
            [--json]                             the fastest mesh/remat/batch, ranked by estimated tokens/s
  profile   --workdir W [--run R --host H --top 15 --json]   summary of the trace that
                                                 --config.profile_steps=N recorded in W/profile
  goodput   --workdir W [--json]                 where the run's wall time went, restarts included
  sweep     --sweep configs/sweeps/X.py --root R [--workdir_root W] [--launcher local|tpu] [--dry_run] [--probe]
                                                 scaling sweep -> R/results.csv, power-law fits, plots
  convert   --from_hf DIR_OR_HUB_ID --workdir W [--config.a.b=v] | --to_hf DIR --workdir W   Hugging Face ImageGPT

eval, probe, finetune and sample also take --config.dataset.*=v (other data than the workdir's) and
--config.batch_size=N. every command also takes --cpu_devices N (N virtual CPU devices) and, for multi-process jobs off Cloud TPU,
--coordinator_address H:P --num_processes N --process_id I.
"""

# "module" defines `define_flags(fv)` and `main(fv)`; "module:name" defines `name_flags(fv)` and `name_main(fv)`.
# A command's module is imported only when it runs. Then the flags it cannot run without.
COMMANDS = {
    "train": ("pixelgpt.train", ("config", "workdir")),
    "eval": ("pixelgpt.evaluate:eval", ("workdir",)),
    "sample": ("pixelgpt.sample:sample", ("workdir",)),
    "score": ("pixelgpt.evaluate:score", ("workdir", "tokens", "out")),
    "probe": ("pixelgpt.evaluate:probe", ("workdir",)),
    "finetune": ("pixelgpt.evaluate:finetune", ("workdir", "out")),
    "convert": ("pixelgpt.interop.hf", ("workdir",)),
    "compile": ("pixelgpt.compile", ("config", "topology")),
    "plan": ("pixelgpt.plan", ("config", "topology")),
    "sweep": ("pixelgpt.sweep", ("sweep", "root")),
    "profile": ("pixelgpt.profile", ("workdir",)),
    "goodput": ("pixelgpt.goodput", ("workdir",)),
}


def _common_flags(fv):
  flags.DEFINE_integer("cpu_devices", 0, "Run on this many virtual CPU devices (the CPU fallback mesh).",
                       flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a multi-process job off Cloud TPU.",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-process job.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.", flag_values=fv)


def _init_jax(fv):
  import jax  # pylint: disable=g-import-not-at-top
  if fv.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", fv.cpu_devices)
  if fv.coordinator_address or fv.num_processes:
    if fv.cpu_devices:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                               process_id=fv.process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    # A Cloud TPU VM with several workers (or slices): JAX finds its peers from the TPU metadata.
    jax.distributed.initialize()


def define_config_flag(fv):
  """--config FILE with --config.a.b=v overrides, shared by the commands that take a config."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py); override keys with --config.a.b=v.",
                                  flag_values=fv, lock_config=True)


def define_workdir_flag(fv):
  flags.DEFINE_string("workdir", None, "A trained (or converted) pixelgpt workdir.", flag_values=fv)


def define_read_flags(fv):
  """--workdir of a trained run, and --config.dataset.*=v (other data to read, e.g. probe a model pretrained on
  another dataset) or --config.batch_size=N on top of the workdir's own config."""
  from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top
  define_workdir_flag(fv)
  config_flags.DEFINE_config_dict(
      "config", config_lib.base(), "--config.dataset.*=v reads other data than the workdir's (its resolution and "
      "channels must be the model's); --config.batch_size=N another batch.", flag_values=fv, lock_config=True)


def config_overrides(fv) -> dict:
  """{'dataset.name': ...}: the --config.* keys given on the command line, not the defaults behind them."""
  return config_flags.get_override_values(fv["config"])


def open_workdir(fv):
  """The workdir of `define_read_flags` with its --config.* overrides applied (workdir.open_run)."""
  from pixelgpt import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return workdir_lib.open_run(fv.workdir, overrides=config_overrides(fv))


def _check_config_file(fv):
  """ml_collections loads a --config file lazily, so a missing one would surface as a traceback deep in a command."""
  try:
    spec = config_flags.get_config_filename(fv["config"])
  except (KeyError, AttributeError, TypeError):  # no --config flag
    return
  if not isinstance(spec, str):  # a config dict (convert), not a file
    return
  path = spec.split(":", 1)[0]  # `file.py:argument`
  if path and not os.path.isfile(path):
    raise UserError(f"config file {path} not found (relative paths start at {os.getcwd()})")


def _explain_flag_error(error: Exception, args: list[str]) -> str:
  """One line for a flag absl or ml_collections refused: an unknown config key with its group and the closest
  known keys, or the reason a config file did not load (the last line of its traceback)."""
  from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top
  known = sorted(config_lib.flat_keys(config_lib.base()))
  groups = {k.rpartition(".")[0] for k in known}
  for arg in args:
    key = arg.removeprefix("--config.").split("=")[0] if arg.startswith("--config.") else None
    if not key or key in known:
      continue
    if key in groups:
      keys = ", ".join(k for k in known if k.startswith(key + "."))
      return f"--config.{key} is a group, not a key: set one of {keys}"
    group = key.rpartition(".")[0]
    name = f"group {group!r}" if group else "the top level"
    where = (f"{name} has {', '.join(k.rpartition('.')[2] for k in known if k.rpartition('.')[0] == group)}"
             if group in groups else f"there is no group {group!r}")
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f"unknown config key {key!r} ({where})" + (f"; closest: {', '.join(close)}" if close else "")
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if len(lines) > 1 and "Error whilst parsing config file" in lines[0]:
    return f"{lines[0]} {lines[-1]}"  # the exception that ended the config file, e.g. a bad `file.py:arg`
  return lines[0] if lines else type(error).__name__


def require(fv, *names):
  """Absent required flags are user errors (one line), not absl's usage dump."""
  for name in names:
    if getattr(fv, name) is None:
      raise UserError(f"--{name} is required")


def parse(argv: list[str]):
  """(parsed flags, the command's main) for `pixelgpt COMMAND FLAGS...`: every check that needs no data,
  model or device — unknown flags and config keys, config files that do not load, required flags absent.
  Raises UserError. (The README test runs every documented command through this.)"""
  sys.argv = argv  # ml_collections' config flags read --config.a.b overrides from sys.argv
  command = argv[1]
  if command not in COMMANDS:
    raise UserError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
  target, required = COMMANDS[command]
  module_name, _, prefix = target.partition(":")
  module = importlib.import_module(module_name)
  define, execute = ((getattr(module, f"{prefix}_flags"), getattr(module, f"{prefix}_main")) if prefix
                     else (module.define_flags, module.main))
  fv = flags.FlagValues()
  _common_flags(fv)
  define(fv)
  try:
    fv([f"pixelgpt {command}"] + argv[2:])
    require(fv, *required)  # before the config file is looked at: an absent --config is not a missing file
    _check_config_file(fv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise UserError(_explain_flag_error(e, argv[2:])) from None
  return fv, execute


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE, end="")
    return 0 if len(argv) >= 2 else 2
  name = f"pixelgpt {argv[1]}" if argv[1] in COMMANDS else "pixelgpt"
  try:
    fv, execute = parse(argv)
    _init_jax(fv)
    execute(fv)
  except UserError as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    return 2
  except (Diverged, StorageError) as e:
    print(f"{name}: {e}", file=sys.stderr)
    return 1
  return 0


def run():
  sys.exit(main())


if __name__ == "__main__":
  run()
