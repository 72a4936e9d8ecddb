"""The comparison at 10 % (configs/compare.py:pct=10): python experiments/compare.py
--config configs/compare_10pct.py[:smoke]"""
from configs import compare


def get_config(arg=None):
  return compare.get_config(f'pct=10,{arg or ""}')
