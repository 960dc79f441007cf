"""Where a run's files live: a local directory or a bucket (gs://), both behind one etils.epath API, and the checks
that make an unusable bucket fail in one line before any work instead of hours into a pod run.

Object stores have no appends and no renames, and an object only changes when a whole upload succeeds. Code that
writes a run's files therefore writes whole files (`write_atomic` gives a local file the same all-or-nothing
property) and moves directories with `move_tree`.
"""

import contextlib
import io
import logging
import os

from etils import epath

from pixelgpt.errors import StorageError, UserError

_usable_buckets: set[str] = set()  # checked once per process


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def path(p) -> epath.Path:
  """A path from the user as an epath.Path: URLs as given, local paths absolute (so every message names the
  same place, whatever the working directory of a later command)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def usable(p, *, what: str) -> epath.Path:
  """`path(p)`, having checked that a gs:// path can be reached: the gcsfs backend is installed, credentials are
  found (Application Default Credentials) and the bucket exists. Raises UserError naming `what` (a flag or key)."""
  p = path(p)
  text = os.fspath(p)
  if not text.startswith("gs://"):
    return p
  bucket = text.removeprefix("gs://").split("/")[0]
  if bucket in _usable_buckets:
    return p
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import  (epath reaches gs:// through it)
  except ImportError:
    raise UserError(f"{what} {text} needs the gcsfs package to reach Cloud Storage: pip install gcsfs") from None
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    # A local emulator (tests) needs no credentials; without this gcsfs would look for them and log warnings.
    import fsspec  # pylint: disable=g-import-not-at-top
    for protocol in ("gs", "gcs"):
      fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")
  else:
    import google.auth  # pylint: disable=g-import-not-at-top
    import google.auth.exceptions  # pylint: disable=g-import-not-at-top
    # google.auth logs each place it looked; the one line below says all of it.
    logger = logging.getLogger("google.auth._default")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
      google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
      raise UserError(f"no Google Cloud credentials to reach {text} ({what}): run `gcloud auth application-default "
                      "login`, set GOOGLE_APPLICATION_CREDENTIALS to a key file, or run on a VM whose service "
                      "account may use the bucket") from None
    finally:
      logger.setLevel(level)
  try:
    exists = epath.Path(f"gs://{bucket}").exists()
  except Exception as e:  # pylint: disable=broad-except  (auth, network and HTTP errors of several libraries)
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"cannot reach bucket gs://{bucket} ({what}): {type(e).__name__}: {reason}") from None
  if not exists:
    raise UserError(f"bucket gs://{bucket} does not exist or these credentials cannot see it ({what} {text}): "
                    f"create it with `gcloud storage buckets create gs://{bucket}` or fix the path")
  _usable_buckets.add(bucket)
  return p


def write_atomic(p: epath.Path, data: bytes | str) -> None:
  """Replaces the file at `p` whole: a kill mid-write leaves the old content, never a torn file. An object store
  gives this by itself (an object changes only when its upload completes); a local file is written beside and
  renamed over."""
  data = data.encode() if isinstance(data, str) else data
  with failing_as_storage_error(f"writing {p}"):
    if is_remote(p):  # no directories to make: one request
      p.write_bytes(data)
      return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


@contextlib.contextmanager
def failing_as_storage_error(what: str, then: str = ""):
  """Turns an error of the storage clients (which have already retried transient ones) into one line."""
  try:
    yield
  except (UserError, StorageError, KeyboardInterrupt):
    raise
  except Exception as e:  # pylint: disable=broad-except  (OSError, HTTP and tensorstore errors of several libraries)
    reason = (str(e).strip().splitlines() or [""])[0][:300]
    raise StorageError(f"{what} failed ({type(e).__name__}: {reason}){then}") from e


def write_png(p: epath.Path, save) -> None:
  """Calls `save(file_object)` (PIL's Image.save, matplotlib's savefig) and stores the PNG bytes at `p`."""
  buffer = io.BytesIO()
  save(buffer)
  write_atomic(p, buffer.getvalue())


def move_tree(src: epath.Path, dst: epath.Path, *, marker: str | None = None) -> None:
  """Moves directory `src` to `dst`, replacing it. Locally one rename. An object store has no rename, so its
  objects are copied (server-side) and deleted; `marker`, the file that makes `src` count as complete (orbax's
  commit_success.txt), is deleted first, so a move cut short never leaves a half directory that looks complete."""
  if dst.exists():
    dst.rmtree()
  if not is_remote(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    return
  if marker:
    (src / marker).unlink(missing_ok=True)
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, _ = fsspec.core.url_to_fs(os.fspath(src))
  fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
  fs.rm(os.fspath(src), recursive=True)
