"""EU-k at 6 % (defaults in configs/base.py, group `eu_k`).

python experiments/unlearn.py --config configs/eu_k_6pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.method = 'eu_k'
  c.forget_fraction = 0.06
  return c
