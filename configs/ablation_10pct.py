"""Forget-MI ablation at 10 %: the paper's five loss-weight settings x image noise x lr x seed.

python experiments/ablate.py --config configs/ablation_10pct.py[:smoke] [--workdir DIR]
python experiments/ablate.py --config configs/ablation_10pct.py --config.ablation.mode=sequential

Default grid: (no_noise, equal, multimodal, unimodal, retention) x noise (mu, sigma) in
{(0, 0.05), (0, 0.1), (0.1, 0.1)} x lr {1e-4, 1e-5} x seed {0}; no_noise ignores the noise, so
4 x 3 x 2 + 1 x 2 = 26 settings. The original / retrained models come from the shared cache
(trained by the first run that needs them). ':smoke' shrinks data, model and schedule and keeps
the five settings at one noise and one lr.
"""
import ml_collections

from configs import base

SETTINGS = ('no_noise', 'equal', 'multimodal', 'unimodal', 'retention')


def add_ablation(c, arg=None):
  """The `ablation` group (shared by the 3 / 6 / 10 % configs)."""
  c.ablation = ml_collections.ConfigDict()
  c.ablation.settings = SETTINGS  # keys of configs.base.LOSS_WEIGHT_PRESETS
  c.ablation.noise = ((0.0, 0.05), (0.0, 0.1), (0.1, 0.1))  # image (mu, sigma) on [0, 1] pixels
  c.ablation.lrs = (1e-4, 1e-5)
  c.ablation.seeds = (0,)  # unlearning seed: data order, retain sample, dropout, image noise
  c.ablation.mode = 'vmap'  # 'vmap' (settings of a seed share one program) | 'sequential'
  c.ablation.memory_budget_gb = 8.0  # device memory for one vmapped chunk of model copies
  c.ablation.chunk_size = 0  # > 0 forces the copies per program (skips the memory measurement)
  c.ablation.keep_checkpoints = False  # sequential mode: keep each setting's checkpoints
  if arg and 'smoke' in [a.strip() for a in str(arg).split(',')]:
    c.ablation.noise = ((0.0, 0.1),)
    c.ablation.lrs = (1e-4,)
    c.ablation.memory_budget_gb = 2.0
  return c


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.10
  c.unlearn.setting = 'retention'  # only read by single runs; the grid sets its own
  return add_ablation(c, arg)
