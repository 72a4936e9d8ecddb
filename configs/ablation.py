"""Forget-MI ablation: the paper's five loss-weight settings x image noise x lr x seed.

python experiments/ablate.py --config configs/ablation.py:pct=10[,smoke] [--workdir DIR]
python experiments/ablate.py --config configs/ablation.py:pct=3 --config.ablation.mode=sequential

Default grid: (no_noise, equal, multimodal, unimodal, retention) x noise (mu, sigma) in
{(0, 0.05), (0, 0.1), (0.1, 0.1)} x lr {1e-4, 1e-5} x seed {0}; no_noise ignores the noise, so
4 x 3 x 2 + 1 x 2 = 26 settings, run as stacked copies on the one loop. The original / retrained
models come from the shared cache. ':smoke' shrinks data, model and schedule and keeps the five
settings at one noise and one lr.
"""
import ml_collections

from configs import unlearn
from forgetmi_jax.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, pct=10, smoke=False, method='forgetmi')
  c = unlearn.build(arg)
  # The paper's grid at the paper's schedule (all epochs): an ablation of the loss weights,
  # noise and lr at a fixed budget. --config.stop.rule=validation stops every setting by the
  # validation rule instead.
  c.stop.rule = 'none'
  c.forgetmi.repair.epochs = 0  # the paper's losses alone, at the paper's schedule
  c.ablation = ml_collections.ConfigDict()
  c.ablation.settings = ('no_noise', 'equal', 'multimodal', 'unimodal', 'retention')
  c.ablation.noise = ((0.0, 0.05), (0.0, 0.1), (0.1, 0.1))  # image (mu, sigma) on [0, 1] pixels
  c.ablation.lrs = (1e-4, 1e-5)
  c.ablation.seeds = (0,)  # unlearning seed: data order, retain sample, dropout, image noise
  c.ablation.mode = 'vmap'  # 'vmap' (stacked copies, one program) | 'sequential'
  c.ablation.memory_budget_gb = 8.0  # device memory for one chunk of stacked copies
  c.ablation.chunk_size = 0  # > 0 forces the copies per program (skips the memory measurement)
  c.ablation.keep_checkpoints = False  # keep each chunk's checkpoints after the grid finishes
  if arg.smoke:
    c.ablation.noise = ((0.0, 0.1),)
    c.ablation.lrs = (1e-4,)
    c.ablation.memory_budget_gb = 2.0
  return c
