"""Forget-MI at 6 % with the paper's best setting for this size (multimodal).

python experiments/unlearn.py --config configs/forgetmi_6pct.py[:smoke]
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.06
  c.unlearn.setting = 'multimodal'
  return c
