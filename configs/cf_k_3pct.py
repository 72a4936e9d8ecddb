"""CF-k at 3 % (defaults in configs/base.py, group `cf_k`).

python experiments/unlearn.py --config configs/cf_k_3pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.method = 'cf_k'
  c.forget_fraction = 0.03
  return c
