"""Every method on the same 10 % forget set, against the cached original and retrained models.

python experiments/compare.py --config configs/compare_10pct.py[:smoke] [--workdir DIR]
python experiments/compare.py --config configs/compare_10pct.py --config.compare.tune=False

Tuning budget (forgetmi_jax/compare.py): every method, Forget-MI included, tries its preset lr
times each of `lr_factors` on the retain set minus a validation set of whole patients, and keeps
the lr with the best macro-F1(validation) - macro-F1(forget); then one final run at that lr.
':smoke' shrinks data, model and schedules (1-2 epochs each) and turns tuning off.
"""
import ml_collections

from configs import base

METHODS = ('forgetmi', 'neggrad_plus', 'scrub', 'cf_k', 'eu_k', 'multidelete')


def get_config(arg=None):
  c = base.get_config(arg)
  c.forget_fraction = 0.10
  c.unlearn.setting = 'retention'  # Forget-MI's best setting at 10 %
  c.compare = ml_collections.ConfigDict()
  c.compare.methods = METHODS
  c.compare.tune = True
  c.compare.lr_factors = (0.3, 1.0, 3.0)
  c.compare.val_fraction = 0.1  # of the retain images, as whole patients
  c.compare.val_seed = 0
  if arg and 'smoke' in [a.strip() for a in str(arg).split(',')]:
    c.compare.tune = False
    c.unlearn.epochs = 1
    for name in ('neggrad_plus', 'cf_k', 'eu_k', 'multidelete'):
      c[name].epochs = 1
    c.scrub.epochs, c.scrub.msteps = 2, 1  # one max+min epoch, one min-only epoch
  return c
