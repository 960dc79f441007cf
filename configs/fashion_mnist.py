"""Fashion-MNIST: the 60,000 real 28×28 training images (Debian's dataset-fashion-mnist) at 8×8 (64 tokens), a
16-grey palette, a 4-layer × 128-wide iGPT: pretrained in under 20 minutes on a 2-core CPU, and its features beat
raw pixels under the paper's linear probe.

  pixelgpt train --config configs/fashion_mnist.py --workdir runs/fashion_mnist
  pixelgpt probe --workdir runs/fashion_mnist

Reads /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`) or --config.dataset.data_dir.

How it was chosen (2-core AMD EPYC, probe = best layer of the linear probe on 10,000 test images — a selection on
the test set, which inflates what it then reports; README's Results re-measure the recipe with the layer and L2
chosen on validation images carved from train, test read once: 82.17% vs 79.66% for the palette pixels):
- Raw-pixel baselines of the same probe on all 60,000 training images, by resolution: 8×8 80.2%, 12×12 83.3%,
  14×14 83.3%, 16×16 83.6%. At 16×16 an image costs 4× the tokens of 8×8 for 3.4 points more to beat, so 8×8.
- Sizes (configs/sweeps/cpu_tiny.py, 400 steps of 32 images at 8×8): 1×8 to 4×128 rose from 60.7% to 77.4%
  (probe on 10,000 training images), still rising with size and far from converged.
- 4 × 256 × 8 heads, batch 64: 2.1 s/step while other jobs ran, ~1 s/step alone, so only ~1,100 steps (1.2
  epochs) fit the budget; stopped.
- 4 × 128 × 4 heads, batch 64, lr 2.5e-3 (0.32/width, the sweep's rule), 1,200 steps: 0.44 s/step, eval loss
  1.025 nats/token; probe on 20,000 training images: best layer (3) 81.2% vs raw pixels 79.8%.
- This recipe: the same model for 2,200 steps (140,800 images, 2.3 epochs), what the budget holds.
"""

from pixelgpt import config as config_lib


def get_config():
  c = config_lib.base()
  c.batch_size = 64
  c.total_steps = 2200
  c.log_every = 50
  c.eval_every = 2200  # one eval, on the whole test split, at the end
  c.checkpoint_every = 550
  c.dataset.name = "fashion_mnist"
  c.dataset.resolution = 8
  c.dataset.channels = 1
  c.dataset.flip = True
  c.dataset.eval_examples = 10000
  c.palette.size = 16
  c.model.n_layer = 4
  c.model.d_model = 128
  c.model.n_head = 4
  c.optim.lr = 2.5e-3
  c.optim.warmup_steps = 100
  # Few-shot accuracy of three layers every 200 steps: representation quality as a curve over training.
  c.fewshot.layers = (2, 3, -1)
  c.fewshot.every = 200
  return c
