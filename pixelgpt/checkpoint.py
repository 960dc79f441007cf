"""Orbax checkpoints of a run: sharded train state, grain iterator state, and the palette + config it used.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax commits a finished step by
renaming its temporary directory on a local disk, and by writing a `commit_success.txt` marker last on object
storage (gs://, where arrays go through tensorstore's own GCS driver); a kill mid-write leaves a step that orbax
does not list and deletes at the next start. `finished_steps` asks orbax the same question for readers (sweep
status) that do not open a manager. The grain iterator's state is
captured synchronously at save time so that the data order resumes exactly. Every save also records a fingerprint
of the state's bits: a restore that does not reproduce it (truncated or corrupted files) falls back to the
previous checkpoint. Restores reshard onto the current mesh and process count.
"""

import json

from etils import epath
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from pixelgpt import storage
from pixelgpt.errors import UserError

COMMIT_MARKER = "commit_success.txt"  # what makes a step directory on object storage count as finished


def finished_steps(workdir) -> list[int]:
  """The checkpoint steps in `workdir` that orbax considers complete (committed), ascending."""
  directory = storage.path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and ocp.utils.is_checkpoint_finalized(p))


@jax.jit
def fingerprint(tree) -> jax.Array:
  """uint32 [leaves]: each leaf's bits summed modulo 2³², so any flipped bit changes its entry."""
  def leaf_sum(x):
    bits = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    return jnp.sum(jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32), dtype=jnp.uint32)
  return jnp.stack([leaf_sum(x) for x in jax.tree.leaves(tree)])


def _remove_unfinished(directory: epath.Path) -> None:
  """Deletes the step directories that a killed save left unfinished (process 0; the others wait for it).

  Done before the manager lists the steps, not by orbax's own cleanup, which runs concurrently with that listing:
  on object storage, where a directory is only a name prefix, the listing then fails once the last object under
  `checkpoints/` (a first save killed mid-write) is gone.
  """
  if jax.process_index() == 0 and directory.exists():
    for child in directory.iterdir():
      if not ocp.utils.is_checkpoint_finalized(child):
        child.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pixelgpt unfinished checkpoints removed from {directory}")


class Checkpointer:
  """A run's checkpoint manager. `read_only` (readers of a workdir: eval, sample, probe) never deletes anything, not
  even the unfinished step a run that is still training is writing."""

  def __init__(self, workdir, *, keep: int, async_save: bool = True, read_only: bool = False):
    self.workdir = storage.path(workdir)
    self.directory = self.workdir / "checkpoints"
    if not read_only:
      _remove_unfinished(self.directory)
    # A reader neither creates, cleans nor saves (orbax's own read_only mode would also say so in 3 warnings).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator, *, config_json: str, palette: np.ndarray) -> bool:
    """Starts an asynchronous save; `data_iterator` is None for weights that no input pipeline produced."""
    meta = {"config": json.loads(config_json), "palette": np.asarray(palette, np.float32).tolist(),
            "fingerprint": [int(v) for v in jax.device_get(fingerprint(state))]}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    # An error of the previous asynchronous save surfaces here, or in wait/close.
    with self._failing_save(f"saving checkpoint {step}"):
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _failing_save(self, what: str):
    return storage.failing_as_storage_error(
        f"{what} in {self.directory}", "; the steps since the newest committed checkpoint are lost: fix the "
        "storage and rerun the same command to resume from that checkpoint")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores checkpoint `step` onto the shardings in `abstract_state` and, if given and saved, the iterator
    in place (a converted checkpoint has no iterator state: its data then starts from the beginning).
    Raises if the restored bits differ from the fingerprint saved with them."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    expected = restored["meta"].get("fingerprint")
    if expected is not None and [int(v) for v in jax.device_get(fingerprint(restored["state"]))] != expected:
      raise ValueError("its arrays do not match the fingerprint saved with them")
    data_dir = self.directory / str(step) / "data"
    if data_iterator is not None and data_dir.is_dir():
      _restore_iterator(data_dir, data_iterator)
    return restored["state"]

  def restore_latest_good(self, abstract_state, data_iterator, report) -> tuple[int | None, object]:
    """The newest checkpoint that restores intact, as (step, state); (None, None) when there is none.

    A damaged one is reported in one line and moved to W/damaged_checkpoints/, so that later saves of the same
    step do not collide with it and it stays available for inspection.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return step, self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        report(f"pixelgpt: checkpoint {step} is damaged ({type(e).__name__}: {reason}); "
               f"moved to {self.workdir / 'damaged_checkpoints'}, trying the previous one")
        self._set_aside(step)
    if steps:
      raise UserError(f"every checkpoint in {self.directory} is damaged ({steps}): see damaged_checkpoints/")
    return None, None

  def _set_aside(self, step: int):
    if jax.process_index() == 0:
      storage.move_tree(self.directory / str(step), self.workdir / "damaged_checkpoints" / str(step),
                        marker=COMMIT_MARKER)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"pixelgpt damaged checkpoint {step}")
    self._manager.reload()

  def wait(self):
    with self._failing_save("finishing a checkpoint save"):
      self._manager.wait_until_finished()

  def close(self):
    self.wait()
    self._manager.close()


def _restore_iterator(data_dir: epath.Path, iterator) -> None:
  """Sets the grain iterator to its saved state, also when the process count changed since the save.

  grain writes one file per process. The pipeline's global order does not depend on the process count and every
  process has consumed the same number of global batches, so any process's state says where all of them are.
  """
  mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not mine.exists():
    saved = sorted(data_dir.glob("process_*-of-*.json"))
    assert saved, f"no iterator state in {data_dir}"
    mine = saved[0]
  iterator.set_state(json.loads(mine.read_text()))


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
