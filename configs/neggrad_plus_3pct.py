"""NegGrad+ at 3 % (defaults in configs/base.py, group `neggrad_plus`).

python experiments/unlearn.py --config configs/neggrad_plus_3pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.method = 'neggrad_plus'
  c.forget_fraction = 0.03
  return c
