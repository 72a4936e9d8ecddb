"""Forget-MI at 10 % with the paper's best setting for this size (retention).

python experiments/unlearn.py --config configs/forgetmi_10pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.10
  c.unlearn.setting = 'retention'
  return c
