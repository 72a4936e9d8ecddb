"""Any unlearning method at 3, 6 or 10 %: `--config configs/unlearn.py:method=scrub,pct=3`.

python experiments/unlearn.py --config configs/unlearn.py:method=neggrad_plus,pct=6[,smoke]
Methods: forgetmi_jax/unlearning/registry.py; each reads its own group (config.<method>).
Forget-MI uses the paper's best loss-weight setting for the size unless --config.forgetmi.setting.
"""
from configs import base
from forgetmi_jax.config import BEST_SETTING, PCTS, parse_arg


def get_config(arg=None):
  return build(parse_arg(arg, method='forgetmi', pct=10, smoke=False))


def build(arg):
  """The config for a parsed arg with `method`, `pct` and `smoke`."""
  if arg.pct not in PCTS:
    raise ValueError(f'pct={arg.pct} is not one of {PCTS}')
  c = base.build(arg)
  c.method = arg.method
  c.forget_fraction = arg.pct / 100
  c.forgetmi.setting = c.forgetmi_paper.setting = BEST_SETTING[arg.pct]
  return c
