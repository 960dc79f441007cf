"""What a compiled program does, read from its optimised HLO text: FLOPs, HBM bytes and every collective, each
counted as many times as it runs.

XLA's own `cost_analysis()` counts a while loop's body once, and pixelgpt scans its layers in one: for a 48-layer
model it sees one layer. This walker multiplies each computation by how often it runs (a while body by its trip
count, from the loop counter's start, step and bound; a fusion's computation, a call or an async computation by
its caller's count), then sums:
- FLOPs of every dot and convolution (2 × its multiply-adds, counting only window taps on real input elements);
- HBM bytes of every instruction the program schedules (a fusion counts once, as its operands plus its output,
  not as the instructions inside it: that is what a fused kernel reads and writes);
- every collective: all-gather, reduce-scatter (also as XLA:TPU writes it, an all-reduce inside an
  `all-reduce-scatter` fusion), all-reduce, all-to-all and collective-permute, with its bytes per device, the size
  of its groups and the groups themselves (estimate.py places them on the torus); between slices, the transfers
  XLA:TPU hands to its data-centre network runtime.
Pallas kernels (tpu_custom_call) are opaque: they are listed with their operands for their authors to count.
"""

import collections
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (tuples and views) or only sequence others.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}

_VIEWS = {"bitcast", "reshape"}
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_LAYOUT = re.compile(r"(?<=\])\{[^}]*\}")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # e.g. 'bf16[8,256]' or a tuple '(s32[], f32[4])', layouts removed
  opcode: str
  operands: list[str]
  arguments: str  # the text between the opcode's parentheses: operands, or a constant's value
  attributes: str  # everything after the operand list
  root: bool = False

  @property
  def bytes(self) -> float:
    return shape_bytes(self.shape)


@dataclasses.dataclass
class Collective:
  kind: str  # one of COLLECTIVES
  bytes: float  # per device: the gathered output, the scattered input, the reduced buffer, the sent buffer
  group_size: int
  groups: list  # the device groups (indices into the program's device assignment) it runs over
  count: int  # times it runs per step
  op_name: str  # the JAX operation it came from (metadata), for reports
  over_dcn: bool = False  # between slices: XLA:TPU writes these as host transfers to the megascale runtime


@dataclasses.dataclass
class Kernel:
  """A Pallas TPU kernel (a tpu_custom_call): opaque to this walker, its FLOPs are its author's to count."""
  name: str  # the pallas_call's name, e.g. splash_mha_fwd_residuals
  operands: list[str]  # operand shapes
  count: int


@dataclasses.dataclass
class Analysis:
  flops: float  # of the dots and convolutions; Pallas kernels' are not in it (see `kernels`)
  hbm_bytes: float
  collectives: list[Collective]
  unknown_trip_counts: int  # while loops whose trip count could not be read (counted once)
  kernels: list[Kernel] = dataclasses.field(default_factory=list)


def shape_bytes(shape: str) -> float:
  return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _split_shape(text: str) -> tuple[str, str]:
  """'(a, b) op(x), k=v' -> ('(a, b)', 'op(x), k=v'); 'f32[2] op(x)' -> ('f32[2]', 'op(x)')."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return text[:i + 1], text[i + 2:]
  shape, _, rest = text.partition(" ")
  return shape, rest


def _parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  shape, rest = _split_shape(_LAYOUT.sub("", match.group(3)))
  opcode, _, rest = rest.partition("(")
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  operands = re.findall(r"%([\w.\-]+)", rest[:end])
  return Instruction(match.group(2), shape, opcode, operands, rest[:end], rest[end + 1:], bool(match.group(1)))


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """{computation name: its instructions}, and the entry computation's name. An instruction may span lines (a
  Pallas kernel's metadata holds newlines): lines that start no instruction continue the previous one."""
  computations, entry, current, pending = {}, None, None, []

  def flush():
    if pending and current is not None:
      instruction = _parse_instruction(" ".join(pending))
      if instruction:
        current.append(instruction)
    pending.clear()

  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      flush()
      current = computations.setdefault(header.group(2), [])
      if header.group(1):
        entry = header.group(2)
    elif line.rstrip() == "}":
      flush()
      current = None
    elif current is not None:
      if _INSTRUCTION.match(line):
        flush()
      pending.append(line)
  flush()
  return computations, entry


def _through_copies(name: str, instructions: dict[str, Instruction]) -> Instruction | None:
  x = instructions.get(name)
  while x is not None and x.opcode in ("copy", "bitcast", "convert") and x.operands:
    x = instructions.get(x.operands[0])
  return x


def _int_constant(x: Instruction | None) -> int | None:
  return int(x.arguments) if x is not None and x.opcode == "constant" and re.fullmatch(r"-?\d+", x.arguments) else None


def _trip_count(loop: Instruction, caller: list[Instruction], computations: dict[str, list[Instruction]]) -> int | None:
  """Iterations of a `for i = start; i < N; i += step` while loop: scans count from 0 by 1, and XLA's windowed
  matmul loops (FSDP's all-gather decomposed into chunks) by 2 from 0. None when the loop is not of that form."""
  callees = dict(_CALLEE.findall(loop.attributes))
  condition = {x.name: x for x in computations.get(callees.get("condition"), [])}
  body = {x.name: x for x in computations.get(callees.get("body"), [])}
  for compare in condition.values():
    if compare.opcode != "compare" or "direction=LT" not in compare.attributes or len(compare.operands) != 2:
      continue
    counter, limit = (_through_copies(o, condition) for o in compare.operands)
    index = re.search(r"index=(\d+)", counter.attributes) if counter and counter.opcode == "get-tuple-element" else None
    if index is None or _int_constant(limit) is None:
      continue
    k, bound = int(index.group(1)), _int_constant(limit)
    step = 1
    root = next((x for x in body.values() if x.root), None)
    if root is not None and root.opcode == "tuple" and k < len(root.operands):
      update = _through_copies(root.operands[k], body)
      if update is not None and update.opcode == "add":
        step = next((c for c in (_int_constant(_through_copies(o, body)) for o in update.operands) if c), 1)
    outside = {x.name: x for x in caller}
    init = outside.get(loop.operands[0]) if loop.operands else None
    first = 0
    if init is not None and init.opcode == "tuple" and k < len(init.operands):
      first = _int_constant(_through_copies(init.operands[k], outside)) or 0
    return max(0, -(-(bound - first) // step))
  return None


def _counts(computations: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, int], set[str], int,
                                                                           dict[str, Instruction]]:
  """How often each computation runs per execution of the entry; which computations are fused (their
  instructions are inside one kernel, not scheduled); how many loops had no readable trip count; the instruction
  that calls each computation (whose metadata names the JAX operation an unnamed collective inside came from)."""
  counts, fused, unknown, callers = collections.Counter({entry: 1}), set(), 0, {}
  order, seen = [entry], {entry}
  while order:
    name = order.pop(0)
    for i in computations.get(name, []):
      callees = [(kind, callee) for kind, callee in _CALLEE.findall(i.attributes)]
      branches = _BRANCHES.search(i.attributes)
      if branches:
        callees += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
      trips = 1
      if i.opcode == "while":
        trips = _trip_count(i, computations.get(name, []), computations)
        if trips is None:
          unknown, trips = unknown + 1, 1
      for kind, callee in callees:
        if callee not in computations or kind == "to_apply":  # reducers run per element: inside their op
          continue
        counts[callee] += counts[name] * (trips if kind in ("body", "condition") else 1)
        if i.opcode == "fusion" or name in fused:
          fused.add(callee)
        if callee not in seen:
          seen.add(callee)
          callers[callee] = i
          order.append(callee)
  return counts, fused, unknown, callers


def _window(attributes: str, spatial: int) -> list[dict]:
  """Per spatial dimension of a convolution: size, stride, low padding, lhs and rhs dilation."""
  per_dim = [{"size": 1, "stride": 1, "pad": 0, "lhs_dilate": 1, "rhs_dilate": 1} for _ in range(spatial)]
  window = re.search(r"window=\{([^}]*)\}", attributes)
  for field in (window.group(1).split() if window else []):
    key, _, value = field.partition("=")
    for d, v in zip(per_dim, value.split("x")):
      if key == "pad":
        d["pad"] = int(v.split("_")[0])
      elif key in d:
        d[key] = int(v)
  return per_dim


def _valid_taps(in_size: int, out_size: int, w: dict) -> int:
  """(output position, window tap) pairs of one spatial dimension that land on a real input element, not on
  padding or on the holes of an lhs dilation (XLA:TPU writes batched matmuls as such convolutions)."""
  position = np.arange(out_size)[:, None] * w["stride"] + np.arange(w["size"])[None, :] * w["rhs_dilate"] - w["pad"]
  valid = (position >= 0) & (position <= (in_size - 1) * w["lhs_dilate"]) & (position % w["lhs_dilate"] == 0)
  return int(valid.sum())


def _dot_flops(i: Instruction, shapes: dict[str, str]) -> float:
  out = dims(i.shape)
  operands = [dims(shapes.get(o, "")) for o in i.operands[:2]]
  if len(operands) < 2 or not all(operands):
    return 0.0
  lhs, rhs = operands
  if i.opcode == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(out) * k
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attributes)
  if not labels:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  spatial = sum(ch.isdigit() for ch in out_labels)
  macs = out[out_labels.index("b")] * out[out_labels.index("f")] * rhs[rhs_labels.index("i")]
  for n, w in enumerate(_window(i.attributes, spatial)):
    macs *= _valid_taps(lhs[lhs_labels.index(str(n))], out[out_labels.index(str(n))], w)
  return 2.0 * macs


def _groups(attributes: str, num_devices: int) -> list[list[int]]:
  """Replica groups in any of XLA's spellings: {{0,1},{2,3}}, iota [2,2]<=[4] (with T(perm)), or the mesh form
  mesh['axis_0'=4,'axis_1'=2] {'axis_0'}. Empty when the instruction names none (one group of all devices)."""
  explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attributes)
  if explicit:
    return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
  if iota:
    shape = [int(d) for d in iota.group(1).split(",")]
    ids = np.arange(math.prod(int(d) for d in iota.group(2).split(","))).reshape(
        [int(d) for d in iota.group(2).split(",")])
    if iota.group(3):
      ids = ids.transpose([int(d) for d in iota.group(3).split(",")])
    return ids.reshape(shape[0], -1).tolist()
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if mesh:
    axes = [(name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))]
    grouped = re.findall(r"'(\w+)'", mesh.group(2))
    names = [name for name, _ in axes]
    ids = np.arange(math.prod(size for _, size in axes)).reshape([size for _, size in axes])
    moved = ids.transpose([names.index(n) for n in names if n not in grouped] + [names.index(n) for n in grouped])
    return moved.reshape(-1, math.prod(dict(axes)[n] for n in grouped)).tolist()
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
  if pairs:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
  return [list(range(num_devices))]


def _collective(i: Instruction, kind: str, shapes: dict[str, str], num_devices: int, count: int,
                caller: Instruction | None, reduce_scatter_input: float | None = None) -> Collective:
  groups = _groups(i.attributes, num_devices)
  size = max(len(g) for g in groups)
  operand = sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
  if kind == "all-gather":
    nbytes = operand * size if i.opcode.endswith("-start") else i.bytes
  elif kind == "reduce-scatter":
    nbytes = reduce_scatter_input if reduce_scatter_input is not None else operand
  else:  # all-reduce, all-to-all, collective-permute: the buffer each device sends
    nbytes = operand
  op_name = re.search(r'op_name="([^"]*)"', i.attributes) or re.search(r'op_name="([^"]*)"',
                                                                       caller.attributes if caller else "")
  return Collective(kind, float(nbytes), size, groups, count, op_name.group(1) if op_name else "")


def _users(body: list[Instruction]) -> dict[str, list[tuple[Instruction, int]]]:
  users = collections.defaultdict(list)
  for x in body:
    for position, operand in enumerate(x.operands):
      users[operand].append((x, position))
  return users


def _param_reads(body: list[Instruction], index: int, full: float,
                 computations: dict[str, list[Instruction]]) -> float:
  """Bytes a fused computation reads of its parameter `index` (`full` bytes): only the slices taken of it, and
  nothing of a buffer it updates in place, following views and nested fusions; all of it otherwise."""
  users = _users(body)
  param = next((x.name for x in body if x.opcode == "parameter" and x.arguments == str(index)), None)

  def uses(name):  # through views: a stacked buffer is often bitcast before it is sliced
    for user, position in users.get(name, []):
      if user.opcode in _VIEWS:
        yield from uses(user.name)
      else:
        yield user, position

  total = 0.0
  for user, position in uses(param):
    if user.opcode == "dynamic-slice" and position == 0:
      total += user.bytes
    elif user.opcode == "dynamic-update-slice" and position == 0:
      continue  # the buffer updated in place: only the update moves, counted as an output
    elif user.opcode == "fusion" and (callee := re.search(r"calls=%([\w.\-]+)", user.attributes)):
      total += _param_reads(computations.get(callee.group(1), []), position, full, computations)
    else:
      return full
  return min(total, full)


def _written(body: list[Instruction], computations: dict[str, list[Instruction]]) -> float:
  """Bytes a fused computation writes: its outputs, an in-place update counting only the update."""
  inner = {x.name: x for x in body}
  root = next(x for x in body if x.root)
  total = 0.0
  for out in ([inner[o] for o in root.operands if o in inner] if root.opcode == "tuple" else [root]):
    while out.opcode in _VIEWS and out.operands and out.operands[0] in inner:
      out = inner[out.operands[0]]
    if out.opcode == "dynamic-update-slice" and len(out.operands) > 1 and out.operands[1] in inner:
      total += inner[out.operands[1]].bytes
    elif out.opcode == "fusion" and (callee := re.search(r"calls=%([\w.\-]+)", out.attributes)):
      total += min(out.bytes, _written(computations.get(callee.group(1), []), computations))
    else:
      total += out.bytes
  return total


def _traffic(i: Instruction, shapes: dict[str, str], computations: dict[str, list[Instruction]]) -> float:
  """HBM bytes one scheduled instruction reads and writes. Slicing reads only the slice, and an in-place update
  (dynamic-update-slice, as a scan writes its layer's results into the stacked buffer) writes only the update,
  also inside a fusion: counting whole buffers would charge a scan over L layers L times the stack."""
  operand_bytes = [shape_bytes(shapes.get(o, "")) for o in i.operands]
  if i.opcode == "dynamic-slice":
    return 2 * i.bytes
  if i.opcode == "dynamic-update-slice":
    return 2 * operand_bytes[1]
  callee = re.search(r"calls=%([\w.\-]+)", i.attributes)
  body = computations.get(callee.group(1), []) if i.opcode == "fusion" and callee else []
  if not body:
    return i.bytes + sum(operand_bytes)
  return (sum(_param_reads(body, k, nbytes, computations) for k, nbytes in enumerate(operand_bytes))
          + _written(body, computations))


def analyse(text: str, num_devices: int) -> Analysis:
  """The analysis of one compiled HLO module that runs on `num_devices` devices."""
  computations, entry = parse(text)
  counts, fused, unknown, callers = _counts(computations, entry)
  flops = hbm = 0.0
  collectives, kernels = [], []
  for name, instructions in computations.items():
    count = counts.get(name, 0)
    if not count:
      continue
    shapes = {i.name: i.shape for i in instructions}
    reduce_scatter = name.startswith("all-reduce-scatter")
    for i in instructions:
      if i.opcode in ("dot", "convolution"):
        flops += count * _dot_flops(i, shapes)
      if i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attributes:
        named = re.search(r'op_name="[^"]*?([\w.\-]+)/pallas_call"', i.attributes)
        kernels.append(Kernel(named.group(1) if named else i.name, [shapes.get(o, "") for o in i.operands], count))
      if name not in fused and i.opcode not in _FREE and not i.opcode.endswith("-done"):
        hbm += count * _traffic(i, shapes, computations)
      kind = i.opcode.removesuffix("-start")
      megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', i.attributes) if i.opcode == "send" else None
      if megascale:
        # Between slices, each device sends its shard of what the slice already reduced or gathered over ICI.
        kind = megascale.group(1).lower().replace("_", "-")
        sent = _ARRAY.search(i.shape)
        collectives.append(Collective(kind if kind in COLLECTIVES else "all-reduce",
                                      shape_bytes(sent.group(0)) if sent else 0.0, 0, [], count, "", over_dcn=True))
      elif kind in COLLECTIVES:
        if reduce_scatter and kind == "all-reduce":
          collectives.append(_collective(i, "reduce-scatter", shapes, num_devices, count, callers.get(name),
                                         i.bytes))
        else:
          collectives.append(_collective(i, kind, shapes, num_devices, count, callers.get(name)))
  return Analysis(flops, hbm, collectives, unknown, kernels)


def collective_bytes(analysis: Analysis) -> dict[str, float]:
  """Bytes per device per step by kind of collective inside a slice, and those sent between slices (over_dcn),
  every run counted."""
  total = collections.Counter()
  for c in analysis.collectives:
    total["over_dcn" if c.over_dcn else c.kind] += c.bytes * c.count
  return {kind: float(total[kind]) for kind in (*COLLECTIVES, "over_dcn")}
