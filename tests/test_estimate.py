"""The compiled program read back (hlo.py) and the step-time estimate (estimate.py), on libtpu's compile-only
TPU topologies: the collectives that FSDP and data parallelism must have, with the bytes their formulas give, and
loops counted as often as they run."""

import importlib.util
import math

import jax
import numpy as np
import pytest

from pixelgpt import compile as compile_lib
from pixelgpt import config as config_lib
from pixelgpt import hlo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (pip install pixelgpt[tpu])")

# XLA's attention: the walker's FLOPs are compared with XLA's own count, which cannot see into a Pallas kernel.
SHAPE = {"model.n_layer": 2, "model.d_model": 256, "model.n_head": 4, "model.dtype": "bfloat16", "batch_size": 8,
         "dataset.resolution": 16, "dataset.channels": 3, "palette.size": 512, "model.attention": "xla"}


def _compiled(topology: str, **overrides) -> compile_lib.Compiled:
  config = config_lib.override(config_lib.base(), {**SHAPE, **overrides})
  return compile_lib.compile_for(config, compile_lib.parse_topology(topology))


def _bytes(params, select, itemsize: int) -> float:
  """Bytes of the parameters whose path `select` accepts, at `itemsize` bytes an element."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(math.prod(x.shape) * itemsize for path, x in leaves if select(jax.tree_util.keystr(path)))


@pytest.fixture(scope="module")
def fsdp():
  return _compiled("v4-8", **{"mesh.fsdp": 4})


def test_fsdp_gathers_every_block_weight_forward_and_backward_and_reduce_scatters_its_gradient(fsdp):
  analysis = fsdp.analysis()
  params = fsdp.setup.abstract_state.params
  # The blocks' weights in the compute dtype (bf16): gathered for the forward pass and again for the backward
  # (nothing is kept between them without remat), their gradients reduced once.
  blocks = _bytes(params, lambda p: "blocks" in p and "kernel" in p, 2)
  gathered = sum(c.bytes * c.count for c in analysis.collectives
                 if c.kind == "all-gather" and "/blocks/" in c.op_name)
  assert gathered == pytest.approx(2 * blocks, rel=0.05)
  reduced = sum(c.bytes * c.count for c in analysis.collectives
                if c.kind in ("reduce-scatter", "all-reduce") and "/blocks/" in c.op_name)
  assert reduced == pytest.approx(blocks, rel=0.05)
  assert {c.group_size for c in analysis.collectives} == {4}
  assert all(c.count == 2 for c in analysis.collectives if "/blocks/" in c.op_name)  # once per layer of the scan


def test_data_parallel_all_reduces_the_gradient_instead(fsdp):
  analysis = _compiled("v4-8", **{"mesh.data": 4, "mesh.fsdp": 1}).analysis()
  blocks = _bytes(fsdp.setup.abstract_state.params, lambda p: "blocks" in p and "kernel" in p, 2)
  kinds = hlo.collective_bytes(analysis)
  assert kinds["all-gather"] == 0 and kinds["reduce-scatter"] == 0  # every device holds every weight
  # Inside the layer loop (run n_layer times), each block's weight gradients summed whole (in bf16), once; XLA
  # combines them into one all-reduce per layer.
  summed = sum(c.bytes * c.count for c in analysis.collectives if c.kind == "all-reduce" and c.count == 2)
  assert summed == pytest.approx(blocks, rel=0.05)


def test_a_scanned_loop_counts_each_layer_like_the_unrolled_program(fsdp):
  scanned = fsdp.analysis()
  unrolled = _compiled("v4-8", **{"mesh.fsdp": 4, "model.scan_layers": False})
  flat = unrolled.analysis()
  assert scanned.unknown_trip_counts == 0
  assert scanned.flops == pytest.approx(flat.flops, rel=1e-6)
  # The compiler's own count of the unrolled program, elementwise work included: ours counts the matmuls.
  assert flat.flops == pytest.approx(unrolled.executable.cost_analysis()["flops"], rel=0.05)
  for kind in ("reduce-scatter", "all-reduce"):
    assert hlo.collective_bytes(scanned)[kind] == pytest.approx(hlo.collective_bytes(flat)[kind], rel=0.05)


def test_replica_groups_in_every_spelling():
  assert hlo._groups("replica_groups={{0,2},{1,3}}, x", 4) == [[0, 2], [1, 3]]
  assert hlo._groups("replica_groups=[2,2]<=[4], x", 4) == [[0, 1], [2, 3]]
  assert hlo._groups("replica_groups=[2,2]<=[2,2]T(1,0), x", 4) == [[0, 2], [1, 3]]
  assert hlo._groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, x", 4) == [[0, 2], [1, 3]]
  assert hlo._groups("source_target_pairs={{0,1},{1,0}}, x", 2) == [[0, 1], [1, 0]]


def test_estimate_names_its_terms_and_data_parallel_across_slices_goes_over_dcn():
  report = compile_lib.compile_train_step(
      config_lib.override(config_lib.base(), {**SHAPE, "mesh.dcn_data": 2, "mesh.fsdp": 8, "batch_size": 16}),
      compile_lib.parse_topology("v5e-8", 2))
  e = report["estimate"]
  assert {"step_s", "mfu", "compute_s", "hbm_s", "ici_s", "dcn_s", "collective_bytes"} <= set(e)
  assert e["dcn_s"] > 0 and e["ici_s"] > 0  # gradients summed across the slices; FSDP inside each
  assert e["step_s"] == max(e["compute_s"], e["hbm_s"], e["ici_s"] + e["dcn_s"]) <= e["serial_s"]
  assert 0 < e["mfu"] < 1
  np.testing.assert_allclose(report["host_images_per_sec"],
                             report["rows_per_process"]["max"] / e["step_s"])


def test_plan_ranks_tensor_parallelism_over_every_device_below_pure_fsdp(tmp_path):
  from pixelgpt import plan  # pylint: disable=g-import-not-at-top
  config = config_lib.override(config_lib.base(), SHAPE)
  topology = compile_lib.parse_topology("v4-8")
  ranked = plan.plan(config, topology, batch_sizes=[8], remats=["none"], cache_dir=str(tmp_path), progress=False)
  layouts = [(c.data, c.fsdp, c.tensor) for c in ranked]
  assert set(layouts) == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
  assert layouts.index((1, 4, 1)) < layouts.index((1, 1, 4))  # a small model gains nothing from splitting heads
  best = ranked[0]
  assert best.report["fits"] and best.status == "compiled" and best.tokens_per_sec > 0
  assert best.tensor < 4 and best.flags().startswith("--config.mesh.data=")
  # A second plan reads every report back from the cache: nothing is compiled again.
  again = plan.plan(config, topology, batch_sizes=[8], remats=["none"], cache_dir=str(tmp_path), progress=False)
  assert {c.status for c in again if c.report} == {"cached"}
  assert [c.overrides for c in again] == [c.overrides for c in ranked]


def test_plan_refuses_unfeedable_batches_without_compiling_and_parses_batch_ranges():
  from pixelgpt import plan  # pylint: disable=g-import-not-at-top
  config = config_lib.override(config_lib.base(), SHAPE)
  c = plan.Candidate(data=4, fsdp=1, tensor=1, remat="none", batch_size=2)
  assert plan.refusal(config, c, num_slices=1).startswith("refused: batch 2")
  assert plan.parse_batch_sizes(["100-1024"], 8) == [128, 256, 512, 1024]
  assert plan.parse_batch_sizes(["48", "16"], 8) == [16, 48] and plan.parse_batch_sizes(None, 8) == [8]
  with pytest.raises(Exception, match="batch_sizes"):
    plan.parse_batch_sizes(["big"], 8)


def test_plan_flag_errors_are_one_line(capsys):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  for bad in (["--remat=none,sometimes"], ["--batch_sizes=0-8"]):
    assert cli.main(["pixelgpt", "plan", "--config=configs/smoke.py", "--topology=v4-8", *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pixelgpt plan: error:" in err


def test_splash_attention_compiles_for_v5p_at_4096_tokens_with_its_flops_counted():
  config = {**SHAPE, "model.n_layer": 1, "model.d_model": 128, "batch_size": 4, "dataset.resolution": 64,
            "model.attention": "splash", "mesh.fsdp": 4}
  compiled = _compiled("v5p-8", **config)
  analysis = compiled.analysis()
  names = {k.name.split("_")[2] for k in analysis.kernels}
  assert names == {"fwd", "dkv", "dq"}  # the Pallas kernels forward and backward, inside the program
  # Causal: 4096 tokens in 8 blocks of 512 leave 36 of the 64 score blocks; 9 matmuls of T×T×head_dim in all.
  heads, head_dim, length = 4, 32, 4096
  attention = 9 * 2 * heads * length * length * head_dim * 36 / 64
  assert compiled.setup.model.cfg.causal
  without = hlo.analyse(compiled.executable.as_text(), 4).flops
  assert analysis.flops - without == pytest.approx(attention, rel=1e-6)


def test_splash_where_mosaic_cannot_compile_it_is_one_line_and_auto_picks_xla_there(capsys):
  from pixelgpt import cli  # pylint: disable=g-import-not-at-top
  args = ["pixelgpt", "compile", "--config=configs/smoke.py", "--topology=v3-8", "--config.dataset.resolution=32",
          "--config.model.dtype=bfloat16"]
  assert cli.main([*args, "--config.model.attention=splash"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not compile for TPU v3" in err
  auto = {"dataset.resolution": 32, "model.attention": "auto"}
  assert _compiled("v3-8", **{"mesh.fsdp": 8, **auto}).config.model.attention == "xla"
  assert _compiled("v4-8", **{"mesh.fsdp": 4, **auto}).config.model.attention == "splash"
