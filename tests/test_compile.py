"""`pixelgpt compile`: TPU topology names, ahead-of-time compiles of the real train step for v3, v4 and multi-slice
v5e topologies (libtpu on this CPU), fits and refusals, and the pod configs' meshes and batches."""

import collections
import importlib.util
import json
import os

import numpy as np
import pytest

from pixelgpt import cli
from pixelgpt import compile as compile_lib
from pixelgpt import config as config_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import sharding as sharding_lib
from tests.conftest import REPO, load_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install pixelgpt[tpu])")
SMOKE = os.path.join(REPO, "configs", "smoke.py")
POD = os.path.join(REPO, "configs", "pod.py")
JSON_KEYS = {"topology", "devices", "mesh", "per_device_bytes", "hbm_bytes", "fits", "flops_per_step", "compile_s"}


def _compile(capsys, *args):
  """(exit status, stdout, stderr) of `pixelgpt compile ARGS`."""
  try:
    status = cli.main(["pixelgpt", "compile", *args])
  except SystemExit as e:  # a misfit exits 1 from inside the command
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


@pytest.mark.parametrize("name,slices,libtpu_name,devices", [
    ("v3-8", 1, "v3:2x2", 8), ("v3-2048", 1, "v3:32x32", 2048), ("v2-32", 1, "v2:4x4", 32),
    ("v4-8", 1, "v4:2x2x1", 4), ("v4-32", 1, "v4:2x2x4", 16), ("v4-2048", 1, "v4:8x8x16", 1024),
    ("v5p-2048", 1, "v5:8x8x16", 1024), ("v5e-8", 1, "v5e:2x4", 8), ("v5e-256", 8, "v5e:16x16", 2048),
    ("v5litepod-256", 1, "v5e:16x16", 256), ("v6e-256", 1, "v6e:16x16", 256)])
def test_accelerator_types_map_to_libtpu_topologies(name, slices, libtpu_name, devices):
  topology = compile_lib.parse_topology(name, slices)
  assert (topology.libtpu_name, topology.num_devices) == (libtpu_name, devices)
  if importlib.util.find_spec("libtpu"):
    assert len(compile_lib.topology_devices(topology)) == devices  # libtpu agrees on what a device is


@pytest.mark.parametrize("name", ["v3-2047", "v7-8", "tpu", "v4-12", "v5p-4"])
def test_unknown_topology_is_a_one_line_user_error(capsys, name):
  status, out, err = _compile(capsys, f"--config={SMOKE}", f"--topology={name}")
  assert status == 2 and not out
  assert err.strip().count("\n") == 0 and f"topology {name!r}" in err


@needs_libtpu
def test_mesh_that_does_not_split_a_weight_is_a_one_line_user_error(capsys):
  # 2048-way FSDP cannot split d_model=128.
  status, out, err = _compile(capsys, f"--config={SMOKE}", "--topology=v3-2048", "--config.batch_size=2048")
  assert status == 2 and not out
  assert err.strip().count("\n") == 0 and "does not split the model" in err


@needs_libtpu
@pytest.mark.parametrize("topology,devices,hbm_gib", [("v3-8", 8, 16), ("v4-8", 4, 32)])
def test_small_model_fits_and_json_reports_sharded_memory(capsys, topology, devices, hbm_gib):
  status, out, _ = _compile(capsys, f"--config={SMOKE}", f"--topology={topology}", "--json")
  assert status == 0
  report = json.loads(out)  # exactly one JSON object on stdout
  assert JSON_KEYS <= report.keys() and report["fits"] and report["topology"] == topology
  assert report["devices"] == devices and report["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
  b = report["per_device_bytes"]
  assert b["total"] == b["arguments"] + b["temp"] + b["output"] - b["alias"] <= report["hbm_bytes"] == hbm_gib * 2**30
  assert b["alias"] > 0  # the donated train state is updated in place
  assert (report["processes"], report["rows_per_process"]) == (1, {"min": 32, "max": 32})  # one host, whole batch
  # Feeding is paced by the estimated step (from the compiled program), not by the assumed MFU.
  assert report["host_images_per_sec"] == pytest.approx(32 / report["estimate"]["step_s"])
  config = load_config("smoke")
  model_cfg = model_lib.ModelConfig.from_config(config)
  assert report["flops_per_step"] == metrics_lib.flops_per_token(model_cfg) * config.batch_size * model_cfg.seq_len
  peak = metrics_lib.PEAK_FLOPS_PER_DEVICE[f"TPU {topology[:2]}"]
  assert report["step_time_s"] == pytest.approx(report["flops_per_step"] / (devices * peak * 0.5))
  if topology == "v3-8":  # FSDP shards the train state: replicated (data=8) it takes 8x, less TPU tile padding
    status, out, _ = _compile(capsys, f"--config={SMOKE}", "--topology=v3-8", "--json", "--config.mesh.data=8",
                              "--config.mesh.fsdp=1")
    assert status == 0 and json.loads(out)["per_device_bytes"]["arguments"] > 3 * b["arguments"]


@needs_libtpu
@pytest.mark.parametrize("arg,rows_per_host", [("l,v5e-256x8", 2), ("l,v4-2048", 1), ("xl,v3-2048", 1)])
def test_every_host_of_a_pod_decodes_exactly_the_rows_its_devices_hold(arg, rows_per_host):
  pod = pod_module()
  config, (_, topology) = pod.get_config(arg), pod.parse(arg)
  mesh = sharding_lib.make_mesh(config.mesh, compile_lib.topology_devices(topology))
  batch = config.batch_size
  placement = sharding_lib.process_rows(sharding_lib.batch_sharding(mesh), batch)
  # Independently of the sharding's index map: the device at mesh position (d, f, t) holds shard d·F + f of the
  # batch, in order; a host holds the union of its devices' shards.
  data, fsdp, _ = mesh.devices.shape
  per_shard = batch // (data * fsdp)
  held = collections.defaultdict(set)
  for (d, f, _), device in np.ndenumerate(mesh.devices):
    held[device.process_index].update(range((d * fsdp + f) * per_shard, (d * fsdp + f + 1) * per_shard))
  assert sorted(placement) == sorted(held) == list(range(len(held)))  # every host of the pod has rows to decode
  assert all(placement[p].tolist() == sorted(held[p]) for p in held)
  assert {len(rows) for rows in placement.values()} == {rows_per_host}
  if rows_per_host > 1:  # v5e's 2x2-chip hosts split the tensor axis: each row is decoded by two hosts, and the
    # contiguous blocks [p·B/P, (p+1)·B/P) a pipeline would give process p are not what its devices hold.
    contiguous = batch // len(held)
    assert any(placement[p].tolist() != list(range(p * contiguous, (p + 1) * contiguous)) for p in held)


@needs_libtpu
def test_compile_reports_the_rows_every_host_decodes(capsys):
  # v4-32: 4 hosts of 4 devices. Tensor 4 stays within a host (8 rows each); tensor 8 spans all four hosts, so
  # every host holds, and must decode, the whole batch.
  for tensor, rows in ((4, 8), (8, 32)):
    status, out, _ = _compile(capsys, f"--config={SMOKE}", "--topology=v4-32", f"--config.mesh.tensor={tensor}",
                              "--config.model.n_head=8", "--json")
    report = json.loads(out)
    assert status == 0 and (report["processes"], report["rows_per_process"]) == (4, {"min": rows, "max": rows})
    assert report["rows_decoded_per_step"] == 4 * rows
  _, out, _ = _compile(capsys, f"--config={SMOKE}", "--topology=v4-32", "--config.mesh.tensor=8",
                       "--config.model.n_head=8")
  assert "feeding: each of 4 hosts decodes 32 of the batch's 32 rows per step (4× the batch in all)" in out


@needs_libtpu
def test_two_slices_form_a_hybrid_mesh_with_data_parallel_across_slices(capsys):
  config = load_config("smoke", **{"mesh.dcn_data": 2})
  mesh = sharding_lib.make_mesh(config.mesh, compile_lib.topology_devices(compile_lib.parse_topology("v5e-4", 2)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for i in range(2):  # each row of the data axis is one slice: only the gradient all-reduce crosses DCN
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  status, out, _ = _compile(capsys, f"--config={SMOKE}", "--topology=v5e-4", "--config.mesh.dcn_data=2", "--json")
  report = json.loads(out)
  assert status == 0 and report["fits"] and report["num_slices"] == 2 and report["devices"] == 8
  status, _, err = _compile(capsys, f"--config={SMOKE}", "--topology=v5e-4", "--num_slices=2")
  assert status == 2 and "config.mesh.dcn_data=1" in err


@needs_libtpu
def test_misfit_exits_1_with_the_compilers_reason(capsys):
  huge_batch = ["--config.dataset.resolution=64", "--config.batch_size=1024", "--config.model.n_layer=1",
                "--config.model.d_model=512"]
  status, out, _ = _compile(capsys, f"--config={SMOKE}", "--topology=v3-8", "--json", *huge_batch)
  report = json.loads(out)
  assert status == 1 and not report["fits"] and report["per_device_bytes"] is None
  assert "RESOURCE_EXHAUSTED" in report["reason"] and "\n" not in report["reason"]


@needs_libtpu
def test_igpt_xl_is_refused_on_a_v3_8(capsys):
  status, out, _ = _compile(capsys, f"--config={os.path.join(REPO, 'configs', 'igpt_xl.py')}", "--topology=v3-8")
  assert status == 1
  verdict = out.strip().splitlines()[-1]
  assert "does not fit: RESOURCE_EXHAUSTED" in verdict and "HBM" in verdict


def pod_module():
  """configs/pod.py as a module (COMBINATIONS, parse, get_config), as benchmarks/pod_table.py loads it."""
  spec = importlib.util.spec_from_file_location("pod", POD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg", pod_module().COMBINATIONS)
def test_pod_config_fills_its_topology_with_the_paper_model_and_epochs(arg):
  pod = pod_module()
  config, (_, topology) = pod.get_config(arg), pod.parse(arg)
  config_lib.validate(config)
  data, fsdp, tensor = sharding_lib.mesh_shape(config.mesh, topology.num_devices)
  slices = topology.num_slices
  assert config.mesh.dcn_data == slices and data * fsdp * tensor * slices == topology.num_devices
  assert config.batch_size == slices * data * fsdp  # one sequence per data-parallel shard
  size = "xl" if config.model.d_model == 3072 else "l"
  paper = config_lib.igpt(size)
  assert (config.model.n_layer, config.model.n_head, config.model.dtype) == (
      paper.model.n_layer, paper.model.n_head, "bfloat16")
  # Same images seen as the paper's 1M steps, warmup of one epoch, whatever the batch.
  assert config.total_steps * config.batch_size == pytest.approx(paper.total_steps * paper.batch_size, rel=1e-3)
  assert config.optim.warmup_steps * config.batch_size == pytest.approx(1_281_167, rel=1e-3)
