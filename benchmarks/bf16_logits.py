"""What rounding the logits to bf16 costs: held-out NLL of a trained smoke model run in float32, in bfloat16 with
the head's logits taken from the matmul's float32 accumulator (what pixelgpt does), and in bfloat16 with those
logits rounded to bf16 first (what it did before: the head's output in the compute dtype).

  python benchmarks/bf16_logits.py [--workdir W]    # W: a trained smoke run (default: trains one, ~90 s)
"""

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixelgpt.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  workdir = args.workdir
  if workdir is None:
    workdir = os.path.join(tempfile.mkdtemp(prefix="bf16_logits_"), "smoke")
    subprocess.run([sys.executable, "-m", "pixelgpt", "train", "--config", "configs/smoke.py", "--workdir", workdir,
                    "--config.fewshot.layers=()"], cwd=common.REPO, check=True, capture_output=True)
  run = workdir_lib.open_run(workdir)
  nll = {"float32": [], "bfloat16, float32 logits": [], "bfloat16, logits rounded to bf16": []}
  models = {dtype: model_lib.Transformer(model_lib.ModelConfig.from_config(
      config_lib.override(run.config, {"model.dtype": dtype}))) for dtype in ("float32", "bfloat16")}
  apply = jax.jit(lambda dtype, p, x: models[dtype].apply({"params": p}, x), static_argnums=0)
  for batch in pipeline.make_eval_batches(run.config, run.palette):
    keep, tokens = batch["mask"] > 0, jnp.asarray(batch["tokens"])
    reference = apply("float32", run.params, tokens)
    half = apply("bfloat16", run.params, tokens)
    for name, logits in (("float32", reference), ("bfloat16, float32 logits", half),
                         ("bfloat16, logits rounded to bf16", half.astype(jnp.bfloat16))):
      nll[name].append(np.asarray(model_lib.token_nll(logits, tokens))[keep])
  per_token = {name: np.concatenate(v) for name, v in nll.items()}
  reference = per_token["float32"]
  m = common.machine()
  rows = [{"setting": name, "nll": float(v.mean()), "mean_abs_diff_vs_f32": float(np.abs(v - reference).mean()),
           "max_abs_diff_vs_f32": float(np.abs(v - reference).max())} for name, v in per_token.items()]
  lines = ["# bf16 logits: held-out NLL of a trained smoke model by precision", "",
           f"`python benchmarks/bf16_logits.py`: configs/smoke.py trained 300 steps in float32, the "
           f"{reference.size:,} held-out tokens scored three ways. Machine: {common.describe(m)}.", "",
           "| setting | NLL (nats/token) | mean abs. difference per token vs float32 | max |", "|---|---|---|---|"]
  lines += [f"| {r['setting']} | {r['nll']:.5f} | {r['mean_abs_diff_vs_f32']:.2e} | {r['max_abs_diff_vs_f32']:.2e} |"
            for r in rows]
  print("\n".join(lines))
  print(f"-> {common.write('bf16_logits', {'machine': m, 'rows': rows}, chr(10).join(lines) + chr(10))}")


if __name__ == "__main__":
  main()
