"""The decoder: causality, the bert objective's masks, the paper's parameter counts, attention and remat variants."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelgpt import config as config_lib
from pixelgpt import hlo as hlo_lib
from pixelgpt import model as model_lib
from pixelgpt import sharding as sharding_lib
from tests.conftest import load_config

SMALL = model_lib.ModelConfig(vocab_size=16, seq_len=256, n_layer=2, d_model=32, n_head=4)


def _params(cfg, seed=0):
  """Initialised params, perturbed so that the zero-initialised head does not hide anything."""
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  bert = None if cfg.causal else jnp.zeros((1, cfg.seq_len), bool)
  params = nn.meta.unbox(model_lib.Transformer(cfg).init(jax.random.key(seed), tokens, bert_mask=bert))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _tokens(cfg, batch=2, seed=3):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.seq_len), 0, cfg.vocab_size)


@pytest.mark.parametrize("attention", ["xla", "einsum", "blockwise"])
def test_changing_token_t_never_changes_logits_before_t(attention):
  cfg = dataclasses.replace(SMALL, attention=attention)
  params, tokens = _params(cfg), _tokens(cfg)
  apply = jax.jit(lambda t: model_lib.Transformer(cfg).apply({"params": params}, t))
  base = apply(tokens)
  for t in (0, 5, 127, 128, 200, 255):
    changed = apply(tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size))
    diff = jnp.abs(changed - base).max(axis=(0, 2))
    # Position t predicts token t from tokens < t, so logits up to and including t must not move ...
    assert float(diff[:t + 1].max()) == 0.0, (attention, t)
    # ... and (unless t is last) later positions do see it.
    if t < cfg.seq_len - 1:
      assert float(diff[t + 1:].max()) > 0.0


def test_first_position_predicts_from_sos_only():
  cfg = SMALL
  params = _params(cfg)
  logits = model_lib.Transformer(cfg).apply({"params": params}, _tokens(cfg, batch=4))
  np.testing.assert_allclose(logits[:, 0], jnp.broadcast_to(logits[0, 0], logits[:, 0].shape), atol=1e-6)


def test_attention_implementations_agree():
  outputs = {}
  for attention in ("xla", "einsum", "blockwise"):
    cfg = dataclasses.replace(SMALL, attention=attention)
    outputs[attention] = model_lib.Transformer(cfg).apply({"params": _params(SMALL)}, _tokens(SMALL))
  np.testing.assert_allclose(outputs["einsum"], outputs["xla"], atol=2e-5)
  np.testing.assert_allclose(outputs["blockwise"], outputs["xla"], atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_and_unscanned_layers_compute_the_same_function(remat):
  params, tokens = _params(SMALL), _tokens(SMALL)

  def loss(cfg, p):
    logits = model_lib.Transformer(cfg).apply({"params": p}, tokens)
    return model_lib.token_nll(logits, tokens).mean()

  value, grads = jax.value_and_grad(lambda p: loss(SMALL, p))(params)
  value_r, grads_r = jax.value_and_grad(lambda p: loss(dataclasses.replace(SMALL, remat=remat), p))(params)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)

  # The same weights, laid out per layer, give the same logits without scan.
  unscanned = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(SMALL.n_layer):
    unscanned[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  cfg = dataclasses.replace(SMALL, scan_layers=False)
  np.testing.assert_allclose(loss(cfg, unscanned), value, rtol=1e-6)


def test_bert_masks_hide_exactly_the_masked_inputs():
  cfg = dataclasses.replace(SMALL, objective="bert")
  params, tokens = _params(cfg), _tokens(cfg)
  mask = model_lib.bert_mask(jax.random.key(0), tokens.shape, 0.15)
  fraction = float(mask.mean())
  assert 0.10 < fraction < 0.20
  apply = lambda t, m: model_lib.Transformer(cfg).apply({"params": params}, t, bert_mask=m)
  base = apply(tokens, mask)
  # A masked position's token is invisible everywhere: changing it changes no logit.
  t = int(jnp.argmax(mask[0]))
  changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
  np.testing.assert_array_equal(apply(changed, mask)[0], base[0])
  # An unmasked token is visible in both directions (no causal mask): earlier positions change too.
  u = int(jnp.argmin(mask[0, 1:])) + 1
  assert not bool(mask[0, u])
  changed = tokens.at[0, u].set((tokens[0, u] + 1) % cfg.vocab_size)
  assert float(jnp.abs(apply(changed, mask)[0, :u] - base[0, :u]).max()) > 0


@pytest.mark.parametrize("name,expected_millions", [("igpt_s", 76), ("igpt_m", 455), ("igpt_l", 1362)])
def test_parameter_counts_match_the_paper(name, expected_millions):
  cfg = model_lib.ModelConfig.from_config(load_config(name))
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  abstract = jax.eval_shape(lambda r: model_lib.Transformer(cfg).init(r, tokens), jax.random.key(0))
  count = model_lib.count_params(abstract["params"])
  assert math.isclose(count / 1e6, expected_millions, rel_tol=0.01), count


def test_init_follows_the_paper():
  cfg = model_lib.ModelConfig(vocab_size=512, seq_len=1024, n_layer=8, d_model=256, n_head=8)
  params = nn.meta.unbox(model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1024), jnp.int32)))
  p = params["params"]
  assert float(jnp.abs(p["head"]["kernel"]).max()) == 0.0
  np.testing.assert_allclose(p["wte"].std(), 0.02, rtol=0.05)
  np.testing.assert_allclose(p["wpe"].std(), 0.01, rtol=0.05)
  np.testing.assert_allclose(p["blocks"]["attn"]["query"]["kernel"].std(), 1 / math.sqrt(256), rtol=0.05)
  np.testing.assert_allclose(p["blocks"]["attn"]["out"]["kernel"].std(), 1 / math.sqrt(256 * 8), rtol=0.05)
  np.testing.assert_allclose(p["blocks"]["mlp"]["fc"]["kernel"].std(), 0.02, rtol=0.05)
  assert "bias" not in p["blocks"]["mlp"]["fc"]  # no biases by default
  # Layers are independent draws, not copies.
  q = p["blocks"]["attn"]["query"]["kernel"]
  assert float(jnp.abs(q[0] - q[1]).max()) > 0


def test_every_weight_has_logical_axis_names():
  cfg = SMALL
  boxed = jax.eval_shape(lambda r: model_lib.Transformer(cfg).init(r, jnp.zeros((1, cfg.seq_len), jnp.int32)),
                         jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)


@pytest.mark.parametrize("attention", ["blockwise", "splash"])
def test_kernel_attention_gradients_equal_the_reference(attention):
  """The blockwise kernel and splash (Pallas's TPU kernel, interpreted on CPU) have hand-written backward passes:
  their gradients must be autodiff's through einsum."""
  params, tokens = _params(SMALL), _tokens(SMALL)

  def loss(attention, p):
    cfg = dataclasses.replace(SMALL, attention=attention)
    logits = model_lib.Transformer(cfg).apply({"params": p}, tokens)
    return model_lib.token_nll(logits, tokens).mean()

  value, grads = jax.value_and_grad(lambda p: loss("einsum", p))(params)
  value_b, grads_b = jax.value_and_grad(lambda p: loss(attention, p))(params)
  np.testing.assert_allclose(value_b, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads_b, grads)


@pytest.mark.parametrize("attention", ["blockwise", "splash"])
def test_kernel_attention_sharded_equals_unsharded(attention):
  """On a 2×2×2 mesh the blockwise loop runs over each device's own (image, head) rows, and splash runs per device
  under shard_map on its own images and heads; nothing may change."""
  params, tokens = _params(SMALL), _tokens(SMALL, batch=4)
  cfg = dataclasses.replace(SMALL, attention=attention)

  def loss(p, t):
    return model_lib.token_nll(model_lib.Transformer(cfg).apply({"params": p}, t), t).mean()

  value, grads = jax.value_and_grad(loss)(params, tokens)
  mesh = sharding_lib.make_mesh(config_lib.override(config_lib.base().mesh, {"data": 2, "fsdp": 2, "tensor": 2}),
                                jax.devices()[:8])
  with sharding_lib.activate(mesh):
    # 4 images over data × fsdp = 4 and 4 heads over tensor = 2: each device holds 1 image × 2 heads.
    assert (sharding_lib.local_size(4, model_lib.BATCH), sharding_lib.local_size(4, model_lib.HEADS)) == (1, 2)
    sharded_tokens = jax.device_put(tokens, sharding_lib.batch_sharding(mesh))
    value_s, grads_s = jax.jit(jax.value_and_grad(loss))(params, sharded_tokens)
  assert sharding_lib.local_size(4, model_lib.BATCH) == 4  # outside a mesh everything is local
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads_s, grads)


def _dense_dot_operand_types(hlo_text: str) -> list[str]:
  """The element types of the operands of every dot a Dense layer wrote (by its op name) in a compiled module."""
  types = []
  for body in hlo_lib.parse(hlo_text)[0].values():
    shapes = {i.name: i.shape for i in body}
    types += [shapes[o].split("[")[0] for i in body if i.opcode == "dot"
              and re.search(r'op_name="[^"]*/(query|key|value|out|fc|proj|head)/dot_general"', i.attributes)
              for o in i.operands]
  return types


def test_bf16_dense_on_cpu_keeps_its_dots_in_bf16_with_autodiffs_gradients(monkeypatch):
  """On CPU a bf16 model's Dense layers write their backward dots themselves (model._bf16_dot) so that XLA runs
  them on bf16 operands (natively, not in f32 between converts); the gradients must be autodiff's through the plain
  dot_general, which the same model uses on other platforms."""
  cfg = dataclasses.replace(SMALL, dtype="bfloat16", attention="blockwise")
  params, tokens = _params(SMALL), _tokens(SMALL)

  def loss(p):
    return model_lib.token_nll(model_lib.Transformer(cfg).apply({"params": p}, tokens), tokens).mean()

  grad = jax.jit(jax.value_and_grad(loss))
  value, grads = grad(params)
  types = _dense_dot_operand_types(grad.lower(params).compile().as_text())
  # The scanned layer body's 6 Dense and the head: a forward and 2 backward dots each, of 2 operands.
  assert len(types) == 2 * 3 * (6 + 1) and set(types) == {"bf16"}
  monkeypatch.setattr(model_lib, "_platform", lambda: "gpu")  # the plain dot_general, differentiated by JAX
  reference = jax.jit(jax.value_and_grad(loss))
  value_r, grads_r = reference(params)
  assert "f32" in _dense_dot_operand_types(reference.lower(params).compile().as_text())  # what the VJP avoids
  np.testing.assert_allclose(value, value_r, rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3, rtol=2e-2), grads, grads_r)
