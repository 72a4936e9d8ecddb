"""The comparison at 3 % (configs/compare.py:pct=3): python experiments/compare.py
--config configs/compare_3pct.py[:smoke]"""
from configs import compare


def get_config(arg=None):
  return compare.get_config(f'pct=3,{arg or ""}')
