"""Every `pixelgpt …` command README.md shows runs as written: through the CLI's own parsing (flags, config keys,
config files, required flags) and, where it is a dry run, all the way."""

import contextlib
import io
import os
import re
import shlex
import sys

import pytest

from pixelgpt import cli
from pixelgpt.errors import UserError
from tests.conftest import REPO


def readme_commands(text: str) -> list[str]:
  """The `pixelgpt` commands of the ```bash blocks (continuations joined, comments dropped, `a && pixelgpt …`
  split) and of inline code that is a whole command (no [optional] syntax)."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split(" #")[0].split("&&"):
        if part.strip().startswith("pixelgpt "):
          commands.append(" ".join(part.split()))
  for span in re.findall(r"`(pixelgpt [^`]+)`", text):
    span = " ".join(span.split())
    if "[" not in span and " --" in span:
      commands.append(span)
  return commands


COMMANDS = readme_commands(open(os.path.join(REPO, "README.md")).read())


def test_the_readme_shows_commands_of_every_kind():
  kinds = {c.split()[1] for c in COMMANDS}
  assert {"train", "eval", "sample", "probe", "sweep", "compile", "profile", "goodput"} <= kinds, kinds


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_and_dry_runs(command, monkeypatch):
  monkeypatch.chdir(REPO)  # README commands run from the repository's root
  monkeypatch.setattr(sys, "argv", list(sys.argv))
  argv = shlex.split(command)  # argv[0] is `pixelgpt`, as in sys.argv
  try:
    cli.parse(argv)
  except UserError as e:
    pytest.fail(f"README: `{command}`: {e}")
  if "--dry_run" in argv:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert cli.main(argv) == 0, f"README: `{command}` failed its dry run"
    assert out.getvalue()


def test_a_broken_command_fails_the_check(monkeypatch):
  """The check itself can fail: a missing required flag, a config file that is not there, an unknown key."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, "argv", list(sys.argv))
  for command in ["pixelgpt sweep --sweep configs/sweeps/cpu_tiny.py --launcher tpu --dry_run",
                  "pixelgpt train --config configs/nope.py --workdir W",
                  "pixelgpt train --config configs/smoke.py --workdir W --config.model.depth=3"]:
    with pytest.raises(UserError):
      cli.parse(shlex.split(command))
