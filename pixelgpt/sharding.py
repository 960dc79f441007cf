"""The device mesh (data × fsdp × tensor, slices folded into data), the one logical->mesh rules table, and the
placement of the global batch: which rows each process must decode so that its devices get theirs.

Every weight and activation in model.py carries logical axis names; changing parallelism is a config change.
On CPU, `--xla_force_host_platform_device_count=N` gives N virtual devices that run the same sharded code.
"""

import collections
import contextlib
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pixelgpt.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over every data-parallel axis

# Pure FSDP within a slice, data parallelism across slices, Megatron-style tensor parallelism on heads/mlp/vocab.
LOGICAL_RULES = (
    # weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("norm", None),
    ("position", None),
    ("layers", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves the -1 axis; raises UserError when the mesh does not use exactly the available devices."""
  slices = mesh_config.dcn_data
  if num_devices % slices:
    raise UserError(f"config.mesh.dcn_data={slices} does not divide the {num_devices} devices")
  per_slice = num_devices // slices
  shape = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
  if -1 in shape:
    known = -math.prod(shape)
    if per_slice % known:
      raise UserError(f"config.mesh {dict(zip(MESH_AXES, shape))} cannot fill {per_slice} devices per slice")
    shape[shape.index(-1)] = per_slice // known
  if math.prod(shape) != per_slice:
    raise UserError(f"config.mesh data×fsdp×tensor = {'×'.join(map(str, shape))} = {math.prod(shape)} does not "
                    f"match the {per_slice} devices per slice ({num_devices} devices, {slices} slice(s))")
  return tuple(shape)


def axis_order(mesh_config) -> tuple[str, ...]:
  """config.mesh.axis_order as axis names, outermost first; raises UserError unless it names each axis once."""
  order = tuple(a.strip() for a in mesh_config.axis_order.split(","))
  if sorted(order) != sorted(MESH_AXES):
    raise UserError(f"config.mesh.axis_order={mesh_config.axis_order!r} must name each of {', '.join(MESH_AXES)} "
                    "once, outermost first (e.g. 'data,fsdp,tensor')")
  return order


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The mesh over `devices` (default: all), its axes laid over the device order as config.mesh.axis_order says:
  the innermost axis on neighbouring devices (on TPU the closest chips, elsewhere consecutive ids, i.e. one host)."""
  devices = list(jax.devices() if devices is None else devices)
  ici = mesh_shape(mesh_config, len(devices))
  slices = mesh_config.dcn_data
  order = axis_order(mesh_config)
  permuted = lambda shape: tuple(shape[MESH_AXES.index(a)] for a in order)
  if slices > 1 and hasattr(devices[0], "slice_index"):
    # Splitting a slice's physical axes lets e.g. 16x16 v5e chips form fsdp 64 × tensor 4.
    grid = mesh_utils.create_hybrid_device_mesh(permuted(ici), permuted((slices, 1, 1)), devices,
                                                allow_split_physical_axes=True)
  else:
    # One slice, or virtual slices on CPU: data parallel across slices is then just a larger data axis.
    shape = permuted((ici[0] * slices, *ici[1:]))
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
      grid = np.asarray(devices).reshape(shape)
  grid = grid.transpose([order.index(a) for a in MESH_AXES])
  # Auto axes: GSPMD propagates shardings from the logical constraints (the default Explicit mode does not).
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def activate(mesh: Mesh):
  """The context in which sharded code is traced: the mesh and the logical rules of its constraints."""
  stack = contextlib.ExitStack()
  # jax.set_mesh, not the legacy `with mesh:`: flax applies logical constraints only under an abstract mesh.
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
  return stack


def logical_sharding(tree, mesh: Mesh):
  """NamedShardings for a tree of (abstract, boxed) values: boxes by their logical names, the rest replicated."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def mesh_axes(logical_name: str) -> tuple[str, ...]:
  """The mesh axes the rules map a logical name to (empty: unsharded)."""
  axes = dict(LOGICAL_RULES)[logical_name]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def local_size(size: int, logical_name: str) -> int:
  """How many of `size` entries along a dimension named `logical_name` one device holds, under the mesh being traced
  (jax.set_mesh, as `activate` sets): size itself outside any mesh or where the rules leave the name unsharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return size
  shards = math.prod(mesh.shape[a] for a in mesh_axes(logical_name))
  return size // shards if size % shards == 0 else size


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """Raises UserError when the mesh cannot be fed this batch: every data-parallel shard needs whole, equal rows.
  Any other mesh can: `process_rows` gives each process the rows its devices hold, wherever they are."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch % shards:
    raise UserError(f"config.batch_size={global_batch} cannot be fed to mesh {dict(mesh.shape)}: it is not "
                    f"divisible by the {shards} data-parallel shards (data×fsdp = "
                    f"{mesh.shape['data']}×{mesh.shape['fsdp']})")


def process_rows(sharding: NamedSharding, batch_size: int) -> dict[int, np.ndarray]:
  """For every process, the sorted distinct rows of a [batch_size, ...] array laid out by `sharding` that its
  devices hold: what that process must decode, each row once however many of its devices (tensor-parallel
  replicas) hold it. Works for any mesh and device order (tensor or fsdp axes across hosts, hybrid multi-slice
  meshes) and for compile-only devices, whose process_index says which host of the target pod holds them."""
  held = collections.defaultdict(set)
  for device, index in sharding.devices_indices_map((batch_size,)).items():
    held[device.process_index].update(range(batch_size)[index[0]])
  return {process: np.array(sorted(rows), dtype=np.int64) for process, rows in sorted(held.items())}


@functools.lru_cache(maxsize=64)
def local_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """`process_rows` of this process (read-only; cached, as the train loop asks at every step)."""
  rows = process_rows(sharding, batch_size)[jax.process_index()]
  rows.flags.writeable = False
  return rows
