"""Forget-MI at 6 % with the paper's best setting for this size (multimodal).

python experiments/unlearn.py --config configs/forgetmi_6pct.py[:smoke]
"""
from configs import unlearn


def get_config(arg=None):
  return unlearn.get_config(f'method=forgetmi,pct=6,{arg or ""}')
