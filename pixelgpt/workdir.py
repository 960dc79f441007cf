"""A run's directory as an API: open a trained workdir (config, palette, sharded params) for eval, sampling,
scoring and probing, or create one from given parameters (conversion from other frameworks).
"""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from pixelgpt import checkpoint as ckpt_lib
from pixelgpt import config as config_lib
from pixelgpt import palette as palette_lib
from pixelgpt import sharding as sharding_lib
from pixelgpt import storage
from pixelgpt import train
from pixelgpt.errors import UserError


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  palette: np.ndarray  # [K, C] float32
  params: Any  # sharded over `mesh`
  setup: train.Setup
  mesh: Any
  step: int


def inference_mesh(config, devices=None):
  """The devices available now, all on fsdp: a workdir trained on any mesh can be read on any machine."""
  return sharding_lib.make_mesh(config_lib.base().mesh, devices)  # the default mesh: pure fsdp, one slice


def read_config(workdir, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The workdir's config.json, with `overrides` ({'dataset.name': ..}) of what a reader may change: the data it
  reads (dataset.*; the resolution and channels stay the model's) and batch_size. Else one UserError line."""
  path = storage.usable(workdir, what="--workdir") / "config.json"
  if not path.exists():
    raise UserError(f"{workdir} is not a pixelgpt workdir (no config.json): train or convert into it first")
  config = config_lib.from_json(path.read_text())
  for key, value in (overrides or {}).items():
    if not (key.startswith("dataset.") or key == "batch_size"):
      raise UserError(f"--config.{key} cannot change when a trained workdir is read: only dataset.* (the data to "
                      "read) and batch_size can")
    if key in ("dataset.resolution", "dataset.channels") and value != config_lib.get(config, key):
      raise UserError(f"--config.{key}={value} does not match the model, trained at {config.dataset.resolution}×"
                      f"{config.dataset.resolution} with {config.dataset.channels} channel(s): images are resized "
                      "and converted to the model's shape, leave these unset")
  if overrides:
    config = config_lib.override(config, overrides)
    config_lib.validate(config)
  return config


def open_run(workdir, *, step: int | None = None, devices=None, overrides: dict | None = None) -> Run:
  config = read_config(workdir, overrides)
  palette = palette_lib.load(storage.path(workdir) / "palette.npy", expect_k=config.palette.size,
                             expect_c=config.dataset.channels)
  mesh = inference_mesh(config, devices)
  s = train.setup(config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, read_only=True)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise UserError(f"{workdir} has no checkpoint yet")
  state = checkpointer.restore(step, s.abstract_state)
  checkpointer.close()
  return Run(config=config, palette=palette, params=state.params, setup=s, mesh=mesh, step=step)


def create(workdir, config, params, palette: np.ndarray) -> None:
  """Writes a workdir whose checkpoint 0 holds `params` (and a fresh optimizer state): `pixelgpt train` on it
  continues pretraining from these weights, and every other command reads it like a trained run."""
  config_lib.validate(config)
  w = storage.usable(workdir, what="--workdir")
  if (w / "checkpoints").exists():
    raise UserError(f"{workdir} already holds checkpoints: choose an empty --workdir")
  mesh = inference_mesh(config)
  s = train.setup(config, mesh)
  params = jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), params,
                        s.abstract_state.params)
  state = train.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                           opt_state=jax.jit(s.tx.init, out_shardings=s.state_shardings.opt_state)(params))
  palette_lib.save(w / "palette.npy", palette)
  config_json = config_lib.to_json(config)
  storage.write_atomic(w / "config.json", config_json)
  checkpointer = ckpt_lib.Checkpointer(w, keep=config.keep_checkpoints)
  checkpointer.save(0, state, None, config_json=config_json, palette=palette)
  checkpointer.close()
