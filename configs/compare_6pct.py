"""The comparison at 6 % (configs/compare.py:pct=6): python experiments/compare.py
--config configs/compare_6pct.py[:smoke]"""
from configs import compare


def get_config(arg=None):
  return compare.get_config(f'pct=6,{arg or ""}')
