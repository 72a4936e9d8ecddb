"""Forget the patients of a request: python experiments/forget.py
--config configs/forget_request.py[:smoke] --config.request.subjects_csv=request.csv
[--config.request.original=PATH] [--workdir DIR]

Without request.original the cached original of the same data config is used (trained if
needed); without request.subjects_csv (synthetic data only) 5 random patients are forgotten.
"""
import ml_collections

from configs import unlearn
from forgetmi_jax.config import parse_arg


def get_config(arg=None):
  # The paper's Forget-MI by default: a request has no validation patients for Forget-MI+'s
  # stopping rule (below), and its fast rate is only safe with that rule.
  arg = parse_arg(arg, smoke=False, method='forgetmi_paper', pct=10)
  c = unlearn.build(arg)  # the method's settings; the forget set comes from the request
  c.request = ml_collections.ConfigDict()
  c.request.subjects_csv = ''  # CSV with a subject_id column
  c.request.original = ''  # .pth/.pt/.bin/.safetensors (public code or ours) or orbax folder
  c.request.export_reference = False  # also write the public code's state dict (.pth)
  c.request.example_subjects = 5  # synthetic data without a CSV: forget this many patients
  # A request's original was trained on every non-TEST patient, so there are no validation
  # non-members to stop on: the method runs its configured epochs.
  c.data.val_fraction = 0.0
  c.stop.rule = 'none'
  return c
