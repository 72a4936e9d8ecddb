"""Forget-MI ablation at 3 % (the grid of configs/ablation_10pct.py).

python experiments/ablate.py --config configs/ablation_3pct.py[:smoke] [--workdir DIR]
"""
from configs import ablation_10pct, base


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.03
  return ablation_10pct.add_ablation(c, arg)
