"""SCRUB at 3 % (defaults in configs/base.py, group `scrub`).

python experiments/unlearn.py --config configs/scrub_3pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.method = 'scrub'
  c.forget_fraction = 0.03
  return c
