"""Forget-MI at 3 % with the paper's best setting for this size (unimodal).

python experiments/unlearn.py --config configs/forgetmi_3pct.py[:smoke]
"""
from configs import unlearn


def get_config(arg=None):
  return unlearn.get_config(f'method=forgetmi,pct=3,{arg or ""}')
