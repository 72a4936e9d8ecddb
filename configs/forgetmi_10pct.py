"""Forget-MI at 10 % with the paper's best setting for this size (retention).

python experiments/unlearn.py --config configs/forgetmi_10pct.py[:smoke]
"""
from configs import unlearn


def get_config(arg=None):
  return unlearn.get_config(f'method=forgetmi,pct=10,{arg or ""}')
