"""The no-oracle yardstick: how far a model is from "never saw the forget patients", judged on
validation non-members only (patients held out of the original's and the retrained model's
training), never on the test set or a retrained model.

A retrained model treats the forget patients as it treats any non-member. So the validation
gap mirrors the paper's Avg. Gap term by term, with validation non-members standing in for
the retrained model and the test set:

  MIA        -> |AUC(-loss: forget vs validation) - 0.5|   an attack at chance
  forget AUC -> |AUC_forget(model) - AUC_val(original)|    forget patients scored like
  forget F1  -> |F1_forget(model)  - F1_val(original)|     non-members of the original
  test AUC   -> |AUC_val(model)    - AUC_val(original)|    utility on non-members held
  test F1    -> |F1_val(model)     - F1_val(original)|

  val_gap = the mean of the five (lower is better; 0 = indistinguishable from non-members).

Every method is tuned (lr) and stopped (epoch) by this one number (runs/compare.py, the loop's
early stopping), so they all get the same rule and none reads what it is judged on.
"""
import math

import numpy as np
from sklearn.metrics import roc_auc_score

from forgetmi_jax.evaluation.evaluator import make_predict_fn, predict_logits
from forgetmi_jax.evaluation.metrics import classification_metrics, per_sample_ce

TERMS = ('member_auc', 'forget_auc', 'forget_f1', 'val_auc', 'val_f1')


def member_auc(forget_losses, val_losses):
  """AUC of the loss attack calling forget examples members: a lower loss scores higher.
  0.5 = forget and validation losses are exchangeable; nan if either set is empty or nan."""
  f, v = np.asarray(forget_losses, np.float64), np.asarray(val_losses, np.float64)
  if f.size == 0 or v.size == 0 or not (np.all(np.isfinite(f)) and np.all(np.isfinite(v))):
    return math.nan
  y = np.r_[np.ones(f.size), np.zeros(v.size)]
  return float(roc_auc_score(y, -np.r_[f, v]))


def validation_gap(model, reference):
  """{term: |gap|, 'val_gap': mean} from `model`'s {member_auc, forget_auc, forget_f1,
  val_auc, val_f1} and the original's `reference` {val_auc, val_f1}. A non-finite term makes
  the gap inf (a diverged model is never the best)."""
  gaps = {
      'gap_member_auc': abs(model['member_auc'] - 0.5),
      'gap_forget_auc': abs(model['forget_auc'] - reference['val_auc']),
      'gap_forget_f1': abs(model['forget_f1'] - reference['val_f1']),
      'gap_val_auc': abs(model['val_auc'] - reference['val_auc']),
      'gap_val_f1': abs(model['val_f1'] - reference['val_f1']),
  }
  values = list(gaps.values())
  gaps['val_gap'] = (float(np.mean(values)) if all(math.isfinite(g) for g in values)
                     else math.inf)
  return gaps


def chance_band(n_forget, n_val, z=1.96):
  """Half-width of the two-sided band of the member AUC under "forget and validation losses
  are exchangeable": z * sqrt((n1 + n2 + 1) / (12 n1 n2)), the Mann-Whitney null's SD."""
  n1, n2 = float(n_forget), float(n_val)
  return float(z) * math.sqrt((n1 + n2 + 1.0) / (12.0 * n1 * n2))


class ValidationMonitor:
  """Scores variables by their validation gap: forwards only (eval mode), on the forget and
  validation sets. Called by the loop after every epoch, so it must stay cheap."""

  def __init__(self, apply_fn, source, split, labels, head='image', batch_size=128):
    if len(split.val_idx) == 0:
      raise ValueError('the validation rule needs validation non-members: set '
                       'data.val_fraction > 0 (or stop.rule="none")')
    self.predict = make_predict_fn(apply_fn, head)
    self.source, self.batch_size = source, int(batch_size)
    self.forget_idx, self.val_idx = np.asarray(split.forget_idx), np.asarray(split.val_idx)
    self.labels = np.asarray(labels)
    self.reference = None

  def measure(self, variables):
    """{member_auc, forget_auc, forget_f1, val_auc, val_f1} of one model."""
    out = {}
    losses = {}
    for name, idx in (('forget', self.forget_idx), ('val', self.val_idx)):
      logits = predict_logits(self.predict, variables, self.source, idx, self.batch_size)
      metrics = classification_metrics(logits, self.labels[idx])
      out[f'{name}_auc'], out[f'{name}_f1'] = metrics['auc'], metrics['f1']
      losses[name] = per_sample_ce(logits, self.labels[idx])
    out['member_auc'] = member_auc(losses['forget'], losses['val'])
    return out

  def at_chance(self, scores, z=1.96):
    """The membership attack cannot tell forget from validation patients (within the null's
    `z` band): the stopping rule's goal."""
    return scores['gap_member_auc'] <= chance_band(len(self.forget_idx), len(self.val_idx), z)

  def set_reference(self, original):
    self.reference = self.measure(original)
    return self.reference

  def __call__(self, variables):
    """The score dict of one model: its five measurements, the five gaps and 'val_gap'."""
    if self.reference is None:
      raise RuntimeError('ValidationMonitor: set_reference(original) first')
    measured = self.measure(variables)
    return {**measured, **validation_gap(measured, self.reference)}
