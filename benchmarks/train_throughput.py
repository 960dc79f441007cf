"""Training throughput side by side: pixelgpt's real train step against transformers' ImageGPT with AdamW, trained in
one process on the same weights and the same batches, timed step by step in turn so both see the same load.

  JAX_PLATFORMS=cpu python benchmarks/train_throughput.py                       # 4 × 256 × 8 heads, T=1024, batch 8
  python benchmarks/train_throughput.py --shape igpt_s --dtype bfloat16 --nohf  # on an accelerator

Both sides: Adam(0.9, 0.95), eps 1e-8, no weight decay, global-norm clipping at 1.0, the same learning-rate
schedule (train.lr_schedule), float32 weights with biases (the converted model is transformers' exactly), no
dropout, loss = mean NLL of all T tokens. MFU counts the same model FLOPs (metrics.flops_per_token) on both sides
and divides by the f32 matmul peak measured in the same run (the best of several 2048³ matmuls through XLA).
"""

from absl import app
from absl import flags

import common  # benchmarks/common.py, next to this script
from pixelgpt import config as config_lib
from pixelgpt import metrics as metrics_lib
from pixelgpt import model as model_lib
from pixelgpt import train

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(common.SHAPES), "Model shape (benchmarks/common.py SHAPES).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "pixelgpt's compute dtype (transformers: float32).")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the shape's).")
flags.DEFINE_integer("n_layer", None, "Layers (default: the shape's); fewer gives a reduced model of that width.")
flags.DEFINE_string("attention", "auto", "pixelgpt's model.attention.")
flags.DEFINE_string("remat", "none", "pixelgpt's model.remat.")
flags.DEFINE_bool("scan_layers", False, "pixelgpt's model.scan_layers: unrolled layers (False) suit a model of a "
                  "few layers, skipping the scan's stacked per-layer buffers (measured 5% faster at 4 layers); "
                  "scanning keeps compile time flat for the paper's 24-48.")
flags.DEFINE_integer("steps", 10, "Timed steps per side (after warm-up); the median is reported.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per side first.")
flags.DEFINE_bool("hf", True, "Also train transformers' ImageGPT (PyTorch) side by side.")
flags.DEFINE_bool("bf16", True, "Also time pixelgpt with model.dtype=bfloat16 and transformers under "
                  "torch.autocast('cpu', bfloat16), in the same rounds.")
flags.DEFINE_string("out", "train_throughput", "Results name under benchmarks/results/ ('' writes nothing).")


def hf_side(config, params, batches, autocast: bool = False):
  """The same model, weights, optimizer, schedule and batches in transformers (PyTorch eager, float32; with
  `autocast`, the forward and loss under torch.autocast('cpu', bfloat16), as a PyTorch user would mix precision)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = common.hf_model(config, params).train()
  o = config.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, betas=(o.b1, o.b2), eps=1e-8, weight_decay=o.weight_decay)
  schedule_fn = train.lr_schedule(config)
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: float(schedule_fn(i)))
  sos = config.palette.size  # transformers' ImageGPT holds the start-of-sequence as the last token id
  holder = {"step": 0, "loss": None}

  def step():
    targets = torch.from_numpy(batches[holder["step"] % len(batches)]).long()
    inputs = torch.cat([torch.full_like(targets[:, :1], sos), targets[:, :-1]], dim=1)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    schedule.step()
    holder["loss"] = loss.detach()
    holder["step"] += 1

  return step, lambda: float(holder["loss"])


def measure(config, *, steps: int, warmup: int, with_hf: bool, bf16: bool) -> dict:
  """Interleaved rounds of: a pixelgpt step, a transformers step (and their bfloat16 pair), the matmul peak;
  medians over rounds."""
  batches = common.random_tokens(config, 4)
  sides, losses = {}, {}
  sides["pixelgpt"], losses["pixelgpt"], params = common.pixelgpt_trainer(config, batches)
  if with_hf:
    sides["transformers"], losses["transformers"] = hf_side(config, params, batches)
  if bf16:
    low = config_lib.override(config, {"model.dtype": "bfloat16"})
    sides["pixelgpt bf16"], losses["pixelgpt bf16"], _ = common.pixelgpt_trainer(low, batches)
    if with_hf:
      sides["transformers bf16 autocast"], losses["transformers bf16 autocast"] = hf_side(config, params, batches,
                                                                                          autocast=True)
  peaks = []
  sides_and_peak = {**sides, "peak": lambda: peaks.append(metrics_lib.measure_cpu_matmul_peak(cached=False))}
  times = common.interleaved(sides_and_peak, steps, warmup)
  peaks = peaks[warmup:]
  model_cfg = model_lib.ModelConfig.from_config(config)
  tokens = config.batch_size * model_cfg.seq_len
  flops = metrics_lib.flops_per_token(model_cfg) * tokens
  result = {"flops_per_step": flops, "tokens_per_step": tokens, "matmul_peak_flops": common.median(peaks),
            "matmul_peak_flops_max": max(peaks), "matmul_peaks": peaks, "sides": {}}
  for name in sides:
    seconds = times[name]
    step_s = common.median(seconds)
    # MFU of each round against the peak measured in that round (the same share of a shared machine), then the
    # median; and the stricter figure against the best peak seen in the whole run.
    mfu = common.median([flops / t / p for t, p in zip(seconds, peaks)])
    result["sides"][name] = {"step_time_s": step_s, "tokens_per_sec": tokens / step_s, "mfu": mfu,
                             "mfu_vs_best_peak": flops / step_s / max(peaks), "step_times_s": seconds,
                             "final_loss": losses[name]()}
  pairs = {"ratio": ("pixelgpt", "transformers"), "ratio_bf16": ("pixelgpt bf16", "transformers bf16 autocast")}
  for key, (ours, theirs) in pairs.items():
    if ours in sides and theirs in sides:
      result[key] = result["sides"][ours]["tokens_per_sec"] / result["sides"][theirs]["tokens_per_sec"]
      # Per-round ratios: both sides of one round ran under nearly the same load.
      result[f"{key}_per_round_median"] = common.median([h / p for p, h in zip(times[ours], times[theirs])])
  return result


def markdown(config, result: dict, machine: dict, command: str) -> str:
  m = config.model
  rounds = len(result["matmul_peaks"])
  lines = [
      "# Training throughput: pixelgpt vs transformers' ImageGPT, side by side",
      "",
      f"`{command}`: {m.n_layer} layers × d {m.d_model} × {m.n_head} heads, T={config.dataset.resolution ** 2}, "
      f"K={config.palette.size}, batch {config.batch_size}; pixelgpt {m.dtype}, attention "
      f"{model_lib.resolve_attention(model_lib.ModelConfig.from_config(config))}, remat {m.remat}, "
      f"scan_layers {m.scan_layers}; transformers "
      f"float32 eager. Medians of {rounds} rounds after warm-up, each round one step of each side and a matmul peak "
      f"measurement (f32, best of 1024³ and 2048³ through XLA: median {result['matmul_peak_flops'] / 1e9:.0f}, best "
      f"{result['matmul_peak_flops_max'] / 1e9:.0f} GFLOP/s). MFU: model FLOPs "
      f"({result['flops_per_step'] / 1e9:.1f} GFLOP/step, metrics.flops_per_token) over step time and the peak of the "
      "same round; in brackets against the best peak of the run. bf16 rows are read against the same f32 peak "
      "(the machine line has the bf16 matmul peaks).",
      f"Machine ({machine['kind']}): {common.describe(machine)}.",
      "",
      "| side | step (s) | tokens/s | MFU | loss after the run |",
      "|---|---|---|---|---|",
  ]
  for name, r in result["sides"].items():
    lines.append(f"| {name} | {r['step_time_s']:.3f} | {r['tokens_per_sec']:,.0f} | {r['mfu']:.1%} "
                 f"({r['mfu_vs_best_peak']:.1%}) | {r['final_loss']:.4f} |")
  for key, what in (("ratio", "float32"), ("ratio_bf16", "bfloat16 (pixelgpt model.dtype vs transformers autocast)")):
    if key in result:
      lines += ["", f"pixelgpt / transformers tokens/s, {what}: **{result[key]:.2f}×** (median of per-round "
                f"ratios {result[f'{key}_per_round_median']:.2f}×)."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = common.shape_config(FLAGS.shape, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size, n_layer=FLAGS.n_layer,
                               attention=FLAGS.attention, remat=FLAGS.remat, use_bias=FLAGS.hf,
                               scan_layers=FLAGS.scan_layers)
  machine = common.machine(measure=True)
  result = measure(config, steps=FLAGS.steps, warmup=FLAGS.warmup, with_hf=FLAGS.hf, bf16=FLAGS.bf16)
  machine["load_average_1m_after"] = round(common.load_average(), 2)
  command = "python benchmarks/train_throughput.py " + " ".join(
      f"--{name}={FLAGS[name].value}" for name in ("shape", "dtype", "attention", "remat", "scan_layers", "steps")
      if FLAGS[name].present)
  text = markdown(config, result, machine, command.strip())
  print(text)
  if FLAGS.out:
    payload = {"command": command.strip(), "machine": machine, "config": config.to_dict(), **result}
    print("->", common.write(f"{FLAGS.out}.{machine['kind']}", payload, text))  # one file per machine kind


if __name__ == "__main__":
  app.run(main)
