"""Forget-MI at 3 % with the paper's best setting for this size (unimodal).

python experiments/unlearn.py --config configs/forgetmi_3pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.03
  c.unlearn.setting = 'unimodal'
  return c
