"""The iGPT decoder (Chen et al. 2020): a GPT-2 style pre-norm transformer over palette tokens.

Follows OpenAI's reference code: no biases, a norm without mean subtraction, quick-GELU, learned positions,
a learned start-of-sequence vector and an untied zero-initialised head. Every weight and activation carries
logical axis names; sharding.py maps them onto the mesh.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelgpt import sharding as sharding_lib

# Logical names of activations (weights use the short names: vocab, embed, heads, kv, mlp, norm, position, layers).
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
HEADS, KV, MLP, VOCAB = "activation_heads", "activation_kv", "activation_mlp", "activation_vocab"

NORM_EPS = 1e-5
BLOCK_SIZE = 128  # query block of the blockwise attention (measured on CPU, T=1024: 128 ≈ 256 < 64)
CACHE_CHUNKS = 8  # of the key/value cache in decoding (Attention._attend_cached)
SPLASH_BLOCKS = (512, 256, 128)
ROWS_PER_STEP = 1  # (image, head) rows per device in each step of the blockwise attention's loop


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int  # palette size K
  seq_len: int  # resolution²
  n_layer: int
  d_model: int
  n_head: int
  mlp_ratio: int = 4
  objective: str = "ar"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  attention: str = "auto"
  use_bias: bool = False

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    m = config.model
    return cls(vocab_size=config.palette.size, seq_len=config.dataset.resolution ** 2, n_layer=m.n_layer,
               d_model=m.d_model, n_head=m.n_head, mlp_ratio=m.mlp_ratio, objective=m.objective, dtype=m.dtype,
               param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
               use_bias=m.use_bias)

  @property
  def causal(self) -> bool:
    return self.objective == "ar"


def _init(std: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std) if std else nn.initializers.zeros, names)


def _platform() -> str:
  """The platform being traced for: the active mesh's devices (a TPU topology when compiling ahead from a CPU
  host), else this process's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


# x @ W in bf16 on XLA:CPU. Its bf16 dots run natively (YNNPACK, 2x the f32 rate on AVX512-BF16) only as
# bf16 x bf16 -> f32; a dot with a bf16 result is run in f32 between converts, and so are the dots autodiff writes
# for the backward pass (their cotangent is the f32 result's, or a bf16 result). This VJP writes both backward dots
# as bf16 x bf16 -> f32. Interleaved A/B in one process on the 2-core AMD EPYC, the benchmark 'small' bf16 step
# (4 x 256, T=1024, batch 8): 2.02 -> 1.62 s. The rounding is autodiff's: each dot accumulates in f32 and is
# rounded to bf16 once.
def _dense_dims(ndim: int, contract: int):
  """dot_general's dimension numbers for x [..., C...] · w [C..., F...] over the last `contract` axes of x."""
  return (tuple(range(ndim - contract, ndim)), tuple(range(contract))), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_dot(x, w, contract: int):
  """x [..., C...] · w [C..., F...] over the `contract` axes C, accumulated and returned in f32."""
  return jax.lax.dot_general(x, w, _dense_dims(x.ndim, contract), preferred_element_type=jnp.float32)


def _bf16_dot_forward(x, w, contract: int):
  return _bf16_dot(x, w, contract), (x, w)


def _bf16_dot_backward(contract: int, residuals, d_y):
  x, w = residuals
  d_y = d_y.astype(x.dtype)
  leading = x.ndim - contract  # x's uncontracted axes, first in x and in d_y
  features = tuple(range(leading, d_y.ndim)), tuple(range(contract, w.ndim))
  d_x = jax.lax.dot_general(d_y, w, (features, ((), ())), preferred_element_type=jnp.float32)
  rows = tuple(range(leading))
  d_w = jax.lax.dot_general(x, d_y, ((rows, rows), ((), ())), preferred_element_type=jnp.float32)
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


_bf16_dot.defvjp(_bf16_dot_forward, _bf16_dot_backward)


class Dense(nn.Module):
  """x @ W (+ b) contracting the last `contract` axes of x; W has logical names `names` (inputs then outputs).

  Written out rather than nn.DenseGeneral, which initialises a flattened kernel and so cannot carry a logical
  sharding constraint for multi-axis features.
  """
  cfg: ModelConfig
  features: tuple
  names: tuple
  std: float
  contract: int = 1
  bias: bool = True  # when cfg.use_bias; the head never has one (nor has ImageGPT's lm_head)
  out_dtype: str | None = None  # the matmul's accumulation and output dtype (default cfg.dtype)

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    shape = x.shape[x.ndim - self.contract:] + self.features
    kernel = self.param("kernel", _init(self.std, self.names), shape, cfg.param_dtype)
    x, kernel = x.astype(cfg.dtype), kernel.astype(cfg.dtype)
    if cfg.dtype == "bfloat16" and _platform() == "cpu":
      y = _bf16_dot(x, kernel, self.contract).astype(self.out_dtype or cfg.dtype)
    else:
      y = jax.lax.dot_general(x, kernel, _dense_dims(x.ndim, self.contract), preferred_element_type=self.out_dtype)
    if cfg.use_bias and self.bias:
      bias = self.param("bias", _init(0.0, self.names[self.contract:]), self.features, cfg.param_dtype)
      y = y + bias.astype(cfg.dtype)
    return y


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x²) + eps) * g: the reference code's norm, without mean subtraction or bias."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.cfg.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + NORM_EPS)
    return (y * scale.astype(jnp.float32)).astype(self.cfg.dtype)


# TPU generations whose Mosaic compiler lacks what splash needs (bf16 matmuls in kernels): XLA's attention there.
NO_SPLASH = ("TPU v2", "TPU v3")


def resolve_attention(cfg: ModelConfig, backend: str | None = None, device_kind: str | None = None) -> str:
  """'auto' picks per backend and device kind (default: this process's): on TPU v4 and later the splash kernel for
  causal sequences of whole 128-token blocks (less memory and a shorter estimated step at every pod shape,
  benchmarks/results/splash_attention.md), XLA's fused attention otherwise and on GPUs, blockwise causal attention
  on CPU."""
  if cfg.attention != "auto":
    return cfg.attention
  backend = backend or jax.default_backend()
  if backend == "tpu" and device_kind is None:
    device_kind = jax.devices()[0].device_kind
  if backend == "tpu" and not (device_kind or "").startswith(NO_SPLASH) and cfg.causal and splash_block(cfg.seq_len):
    return "splash"
  if backend != "cpu":
    return "xla"
  return "blockwise" if cfg.causal and cfg.seq_len > BLOCK_SIZE and cfg.seq_len % BLOCK_SIZE == 0 else "einsum"


def _softmax_attention(q, k, v, mask, dtype):
  """q [B, Q, N, H], k and v [B, K, N, H], mask broadcastable to [B, N, Q, K] (True: visible) -> [B, Q, N, H]."""
  scores = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def attention(q, k, v, *, causal: bool, implementation: str, dtype):
  """q, k, v: [batch, length, heads, head_dim] -> [batch, length, heads, head_dim]."""
  length = q.shape[1]
  if implementation == "splash":
    return _splash_attention(q, k, v, causal=causal).astype(dtype)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  if implementation == "einsum" or not causal:
    mask = jnp.tril(jnp.ones((length, length), bool)) if causal else None
    return _softmax_attention(q, k, v, mask, dtype)
  block = math.gcd(BLOCK_SIZE, length)
  batch, _, heads, head_dim = q.shape
  # A loop over (image, head) rows, ROWS_PER_STEP per device per step: a block's scores (block × keys, 0.5 MB per row
  # at T=1024) then stay in the core's cache. With all rows in each block op they were 16 MB and every softmax pass
  # went to memory: 2× slower. The loop runs over the device-local part of batch and heads, so sharding is kept.
  local_b, local_n = sharding_lib.local_size(batch, BATCH), sharding_lib.local_size(heads, HEADS)
  rows = math.gcd(ROWS_PER_STEP, local_b * local_n)
  steps = local_b * local_n // rows

  def to_rows(x):  # [B, T, N, H] -> [steps, rows, B / local_b, N / local_n, T, H]
    x = x.reshape(batch // local_b, local_b, length, heads // local_n, local_n, head_dim).transpose(1, 4, 0, 3, 2, 5)
    return x.reshape(steps, rows, batch // local_b, heads // local_n, length, head_dim)

  # Scaling q once spares a pass over every block of scores.
  out = _blockwise_causal(*(to_rows(x) for x in (q / math.sqrt(head_dim), k, v)), block)
  out = out.reshape(local_b, local_n, batch // local_b, heads // local_n, length, head_dim).transpose(2, 0, 4, 3, 1, 5)
  return out.reshape(batch, length, heads, head_dim).astype(dtype)


def splash_block(length: int) -> int:
  """The splash kernel's query and key block: the largest of 512, 256, 128 that divides the sequence (the kernel
  needs whole blocks; 512 keeps the matrix units busy at T >= 1024, smaller blocks fit shorter sequences)."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), 0)


# Matmuls of T × T × head_dim in each of splash's kernels: forward q·kᵀ and p·v; the dkv pass recomputes q·kᵀ and
# forms dp = do·vᵀ, dv = pᵀ·do, dk = dsᵀ·q; the dq pass recomputes q·kᵀ and dp, and forms dq = ds·k.
SPLASH_MATMULS = {"fwd": 2, "dkv": 4, "dq": 3}


def splash_flops(kernel_name: str, q: tuple[int, ...], causal: bool) -> float:
  """FLOPs of one run of a splash kernel whose queries are `q` [..., T, head_dim], counting only the blocks the
  causal mask leaves (the diagonal ones whole); 0 for other kernels."""
  part = next((p for p in SPLASH_MATMULS if kernel_name.startswith(f"splash_mha_{p}")), None)
  if part is None:
    return 0.0
  length, head_dim = q[-2], q[-1]
  blocks = length // max(splash_block(length), 1)
  density = (blocks + 1) / (2 * blocks) if causal else 1.0
  return SPLASH_MATMULS[part] * 2.0 * math.prod(q[:-2]) * length * length * head_dim * density


def _splash_attention(q, k, v, *, causal: bool):
  """Pallas's TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention): FlashAttention's tiling with
  the causal mask's empty blocks skipped, forward and backward, never a T×T score matrix in HBM. Runs per device
  under shard_map over the mesh being traced (batch over data×fsdp, heads over tensor), one example at a time."""
  # pylint: disable=g-import-not-at-top  (Pallas TPU kernels load only where they are used)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  batch, length, heads, head_dim = q.shape
  block = splash_block(length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  local_heads = sharding_lib.local_size(heads, HEADS)
  one = masks.CausalMask((length, length)) if causal else masks.FullMask((length, length))
  mesh = jax.sharding.get_abstract_mesh()
  # Where the devices traced for are CPUs (tests), Pallas interprets the kernel: the same blocks and masks, slowly.
  kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * local_heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=_platform() == "cpu")
  batch_axes = sharding_lib.mesh_axes(BATCH) if sharding_lib.local_size(batch, BATCH) != batch else None
  head_axes = sharding_lib.mesh_axes(HEADS) if local_heads != heads else None
  spec = jax.sharding.PartitionSpec(batch_axes, head_axes, None, None)
  # Heads-major [B, N, T, H] as the kernel reads them; q scaled here (the kernel does not).
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q / math.sqrt(head_dim), k, v))
  run = jax.vmap(kernel)
  if not mesh.empty:
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return run(q, k, v).transpose(0, 2, 1, 3)


# Blockwise causal attention, FlashAttention's algorithm written for XLA:CPU. Query block i attends only to keys up
# to its diagonal, so half of the score work is never done, and each block's scores stay small enough for the cache.
# The backward pass recomputes the probabilities of each block from q, k and the saved log-sum-exp instead of keeping
# all of them (the dominant memory traffic of autodiff through a softmax), and works on key-major blocks so that dK
# and dV are plain matmuls rather than products with a transposed operand, which XLA:CPU first copies.
# Measured at 4 × 256 × 8 heads, T=1024, batch 8: the train step 1.4× faster than autodiff through the same blocks.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_causal(q, k, v, block: int):
  """q (already scaled), k, v: [steps, rows, ..., length, head_dim] -> the same; a loop over steps."""
  return _blockwise_rows_forward(q, k, v, block)[0]


# The loops keep their stacked per-step results in f32 and cast once after. XLA:CPU has no bf16 dynamic-update-slice:
# it converts the whole stacked bf16 buffer to f32 and back around each step's one-row write, and those copies were
# 23% of the bf16 train step's op time at 4 × 256 × 8 heads, T=1024, batch 8 (`pixelgpt profile`). For the
# same reason the custom VJP wraps the loop, not its body: a body's residuals (q, k, v, out) would be stacked per step.
def _blockwise_rows_forward(q, k, v, block: int):
  out, log_sum_exp = jax.lax.map(lambda qkv: _blockwise_forward(*qkv, block), (q, k, v))
  out = out.astype(q.dtype)
  return out, (q, k, v, out, log_sum_exp)


def _blockwise_rows_backward(block: int, residuals, d_out):
  grads = jax.lax.map(lambda row: _blockwise_backward(block, *row), (*residuals, d_out))
  return tuple(g.astype(x.dtype) for g, x in zip(grads, residuals))


def _future_mask(start: int, queries: int, keys: int, *, key_major: bool = False):
  """True where key position > query position (start + row): what a causal query block must not see."""
  shape = (keys, queries) if key_major else (queries, keys)
  query = start + jax.lax.broadcasted_iota(jnp.int32, shape, int(key_major))
  key = jax.lax.broadcasted_iota(jnp.int32, shape, 1 - int(key_major))
  return key > query


def _blockwise_forward(q, k, v, block: int):
  outputs, log_sum_exps = [], []
  for start in range(0, q.shape[-2], block):
    end = start + block
    scores = jnp.einsum("...qh,...kh->...qk", q[..., start:end, :], k[..., :end, :], preferred_element_type=jnp.float32)
    scores = jnp.where(_future_mask(start, block, end), -jnp.inf, scores)
    peak = jnp.max(scores, axis=-1, keepdims=True)  # finite: every query sees itself
    probs = jnp.exp(scores - peak)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    outputs.append(jnp.einsum("...qk,...kh->...qh", probs.astype(v.dtype), v[..., :end, :],
                              preferred_element_type=jnp.float32) / total)
    log_sum_exps.append((peak + jnp.log(total))[..., 0])
  return jnp.concatenate(outputs, axis=-2), jnp.concatenate(log_sum_exps, axis=-1)


def _blockwise_backward(block: int, q, k, v, out, log_sum_exp, d_out):
  """One row's dq, dk, dv in f32."""
  # Σ_k P·dP per query equals Σ_h out·d_out: the softmax backward's row term without the probabilities.
  row_term = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  dq = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start in range(0, q.shape[-2], block):
    end = start + block
    q_block, d_out_block = q[..., start:end, :], d_out[..., start:end, :]
    scores_t = jnp.einsum("...kh,...qh->...kq", k[..., :end, :], q_block, preferred_element_type=jnp.float32)
    probs_t = jnp.exp(scores_t - log_sum_exp[..., None, start:end])
    probs_t = jnp.where(_future_mask(start, block, end, key_major=True), 0.0, probs_t)
    dv = dv.at[..., :end, :].add(jnp.einsum("...kq,...qh->...kh", probs_t.astype(v.dtype), d_out_block,
                                          preferred_element_type=jnp.float32))
    d_probs_t = jnp.einsum("...kh,...qh->...kq", v[..., :end, :], d_out_block, preferred_element_type=jnp.float32)
    d_scores_t = (probs_t * (d_probs_t - row_term[..., None, start:end])).astype(q.dtype)
    dk = dk.at[..., :end, :].add(jnp.einsum("...kq,...qh->...kh", d_scores_t, q_block,
                                            preferred_element_type=jnp.float32))
    dq.append(jnp.einsum("...kq,...kh->...qh", d_scores_t, k[..., :end, :], preferred_element_type=jnp.float32))
  return jnp.concatenate(dq, axis=-2), dk, dv


_blockwise_causal.defvjp(_blockwise_rows_forward, _blockwise_rows_backward)


class Attention(nn.Module):
  """Multi-head attention. With `decode`, x is one position and keys/values accumulate in a preallocated
  'cache' collection of length seq_len (sharded like activations), so no prefix is ever recomputed; `chunk` is the
  cache chunk (a static int, see cache_chunks) that holds the position being decoded."""
  cfg: ModelConfig
  decode: bool = False
  chunk: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.n_head
    qkv_std = 1.0 / math.sqrt(cfg.d_model)
    names = ("embed", "heads", "kv")
    q, k, v = (Dense(cfg, (cfg.n_head, head_dim), names, qkv_std, name=name)(x) for name in ("query", "key", "value"))
    q, k, v = (nn.with_logical_constraint(t, (BATCH, LENGTH, HEADS, KV)) for t in (q, k, v))
    if self.decode:
      out = self._attend_cached(q, k, v)
    else:
      out = attention(q, k, v, causal=cfg.causal, implementation=resolve_attention(cfg), dtype=cfg.dtype)
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, HEADS, KV))
    out_std = 1.0 / math.sqrt(cfg.d_model * cfg.n_layer)
    return Dense(self.cfg, (cfg.d_model,), ("heads", "kv", "embed"), out_std, contract=2, name="out")(out)

  def _attend_cached(self, q, k, v):
    assert self.cfg.causal and q.shape[1] == 1, "decoding is one position at a time of the 'ar' model"
    # Heads-major chunks [B, N, T / chunks, H]: the scores and the weighted sum are matrix-vector products batched
    # over the leading (image, head) axes, which XLA:CPU runs straight from the cache (in the activations' layout
    # they needed a transposed copy of the cache at every position), and a position in chunk c reads chunks <= c
    # only: whole buffers, so no sliced copies, and 56% of the full cache's reads over an image at 8 chunks.
    batch, _, heads, head_dim = q.shape
    chunks = cache_chunks(self.cfg.seq_len)
    size = self.cfg.seq_len // chunks
    shape = (batch, heads, size, head_dim)
    keys = [self.variable("cache", f"key_{j}", jnp.zeros, shape, k.dtype) for j in range(chunks)]
    values = [self.variable("cache", f"value_{j}", jnp.zeros, shape, v.dtype) for j in range(chunks)]
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    i, c = index.value, self.chunk
    for cached, new in ((keys[c], k), (values[c], v)):
      cached.value = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice_in_dim(cached.value, jnp.swapaxes(new, 1, 2), i - c * size, 2),
          (BATCH, HEADS, LENGTH, KV))
    index.value = i + 1
    scores = jnp.concatenate([jnp.einsum("bnh,bnkh->bnk", q[:, 0], keys[j].value, preferred_element_type=jnp.float32)
                              for j in range(c + 1)], axis=-1)
    # Positions not yet written hold zeros: mask them out.
    scores = jnp.where(jnp.arange((c + 1) * size) <= i, scores / math.sqrt(head_dim), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.cfg.dtype)
    out = sum(jnp.einsum("bnk,bnkh->bnh", probs[..., j * size:(j + 1) * size], values[j].value,
                         preferred_element_type=jnp.float32) for j in range(c + 1))
    return out[:, None].astype(v.dtype)


def cache_chunks(seq_len: int) -> int:
  """Chunks of the decoding cache: CACHE_CHUNKS where they divide the sequence, else one."""
  return CACHE_CHUNKS if seq_len % CACHE_CHUNKS == 0 else 1


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = Dense(cfg, (cfg.mlp_ratio * cfg.d_model,), ("embed", "mlp"), 0.02, name="fc")(x)
    h = nn.with_logical_constraint(quick_gelu(h), (BATCH, LENGTH, MLP))
    return Dense(cfg, (cfg.d_model,), ("mlp", "embed"), 0.02, name="proj")(h)


class Block(nn.Module):
  """Pre-norm residual block; also returns the probe feature mean_t(ln_1(h)) of its input."""
  cfg: ModelConfig
  decode: bool = False
  chunk: int = 0

  @nn.compact
  def __call__(self, h, _=None):
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, EMBED))
    normed = RMSNorm(self.cfg, name="ln_1")(h)
    feature = jnp.mean(normed.astype(jnp.float32), axis=1)
    h = h + Attention(self.cfg, self.decode, self.chunk, name="attn")(normed)
    h = h + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="ln_2")(h))
    return nn.with_logical_constraint(h, (BATCH, LENGTH, EMBED)), feature


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, K] float32, where position t predicts token t.

  'ar': inputs are [sos, x_0 … x_{T-2}] under a causal mask. 'bert': inputs are the tokens themselves with the
  embedding of masked positions zeroed (bert_mask [B, T] bool), no causal mask.
  Decoding (`decode_position=t`, 'ar' only): tokens [B, 1] holds x_{t-1} (ignored at t = 0, where the input is
  sos), the 'cache' collection is mutable, and the logits [B, 1, K] predict x_t; `decode_chunk` (a static int) must
  be t // (seq_len // cache_chunks(seq_len)).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, bert_mask=None, return_features: bool = False, decode_position=None,
               decode_chunk: int = 0):
    cfg = self.cfg
    batch, length = tokens.shape
    wte = self.param("wte", _init(0.02, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    wpe = self.param("wpe", _init(0.01, ("position", "embed")), (cfg.seq_len, cfg.d_model), cfg.param_dtype)
    sos = self.param("sos", _init(0.02, ("embed",)), (cfg.d_model,), cfg.param_dtype)
    x = jnp.take(wte, tokens, axis=0)
    decode = decode_position is not None
    if decode:
      x = jnp.where(decode_position == 0, sos, x)
      positions = jax.lax.dynamic_slice_in_dim(wpe, decode_position, 1)
    elif cfg.causal:
      x = jnp.concatenate([jnp.broadcast_to(sos, (batch, 1, cfg.d_model)), x[:, :-1]], axis=1)
      positions = wpe[:length]
    else:
      assert bert_mask is not None, "the bert objective needs bert_mask"
      x = jnp.where(bert_mask[..., None], 0.0, x)
      positions = wpe[:length]
    h = nn.with_logical_constraint((x + positions).astype(cfg.dtype), (BATCH, LENGTH, EMBED))

    block = Block
    if cfg.remat != "none" and not decode:
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                       length=cfg.n_layer, metadata_params={nn.PARTITION_NAME: "layers"})
      blocks = blocks(cfg, decode, decode_chunk, name="blocks")
      h, features = blocks(h, None)  # features [L, B, d]
    else:
      features = []
      for i in range(cfg.n_layer):
        h, feature = block(cfg, decode, decode_chunk, name=f"block_{i}")(h)
        features.append(feature)
      features = jnp.stack(features)

    h = RMSNorm(cfg, name="ln_f")(h)
    # Logits straight from the matmul's float32 accumulator: rounding them to bf16 first would put ~0.4% noise on
    # every logit the loss and the sampler read.
    logits = Dense(cfg, (cfg.vocab_size,), ("embed", "vocab"), 0.0, bias=False, out_dtype="float32",
                   name="head")(h)
    logits = nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB))
    if return_features:
      # Probe features: mean over positions of ln_1(h_l) for every layer l, then of ln_f(h_L).
      final = jnp.mean(h.astype(jnp.float32), axis=1)
      return logits, jnp.concatenate([features, final[None]], axis=0)
    return logits


def unstack_layers(params: dict, n_layer: int) -> dict:
  """Params of a scan_layers model -> the same weights as an unrolled model's (blocks/x[i] -> block_i/x)."""
  out = {name: value for name, value in params.items() if name != "blocks"}
  out.update({f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n_layer)})
  return out


def token_nll(logits, tokens):
  """Per-position negative log-likelihood in nats: [B, T, K], [B, T] -> [B, T] float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return log_z - target


def bert_mask(rng, shape, prob: float):
  return jax.random.bernoulli(rng, prob, shape)


def count_params(params, *, exclude_embeddings: bool = False) -> int:
  """Parameters of a (possibly boxed or abstract) params tree; embeddings are wte, wpe, sos."""
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  total = 0
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if exclude_embeddings and any(f"'{e}'" in name for e in ("wte", "wpe", "sos")):
      continue
    total += math.prod(leaf.shape)
  return total
