"""MultiDelete at 6 % (defaults in configs/base.py, group `multidelete`).

python experiments/unlearn.py --config configs/multidelete_6pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.method = 'multidelete'
  c.forget_fraction = 0.06
  return c
