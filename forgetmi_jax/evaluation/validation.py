"""The no-oracle yardstick: how far a model is from "never saw the forget patients", judged on
validation non-members only (patients held out of the original's and the retrained model's
training), never on the test set or a retrained model.

A retrained model treats the forget patients as it treats any non-member, and keeps its retain
set memorised as the original does (both trained on it for the same epochs). So the validation
gap mirrors the paper's Avg. Gap term by term, with validation non-members standing in for the
test set and the original on validation data for the retrained model:

  MIA        -> attack 'svc': |SVC_forget(model) - SVC_val(original)|     the paper's attack
                (REFERENCE 5) fitted on retain members vs validation non-members: the
                fraction of forget images it calls members should be the fraction of
                non-members the same attack calls members for the original;
                attack 'auc': |AUC(-loss: forget vs validation) - 0.5|   (blind to retain)
  forget AUC -> |AUC_forget(model) - AUC_val(original)|    forget patients scored like
  forget F1  -> |F1_forget(model)  - F1_val(original)|     non-members of the original
  test AUC   -> |AUC_val(model)    - AUC_val(original)|    utility on non-members held
  test F1    -> |F1_val(model)     - F1_val(original)|

  val_gap = the mean of the five (lower is better; 0 = indistinguishable from non-members).

Why the SVC: the paper's attack learns "member" from the retain losses, so a model that has
stopped memorising its retain set (retain losses up at the non-members') makes it call nearly
everything a member, the forget set included, far from the retrained model's score. The
loss AUC of forget vs validation cannot see that; the SVC term does, from a fixed sample of
retain images weighted to the evaluation's retain : test balance.

Every method is tuned (lr) and stopped (epoch) by this one number (runs/compare.py, the loop's
early stopping), so they all get the same rule and none reads what it is judged on.
"""
import math

import numpy as np
from sklearn.metrics import roc_auc_score

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.evaluation.evaluator import make_predict_fn, predict_logits
from forgetmi_jax.evaluation.metrics import classification_metrics, per_sample_ce
from forgetmi_jax.evaluation.mia import svc_mia

ATTACKS = ('svc', 'auc')


def member_auc(forget_losses, val_losses):
  """AUC of the loss attack calling forget examples members: a lower loss scores higher.
  0.5 = forget and validation losses are exchangeable; nan if either set is empty or nan."""
  f, v = np.asarray(forget_losses, np.float64), np.asarray(val_losses, np.float64)
  if f.size == 0 or v.size == 0 or not (np.all(np.isfinite(f)) and np.all(np.isfinite(v))):
    return math.nan
  y = np.r_[np.ones(f.size), np.zeros(v.size)]
  return float(roc_auc_score(y, -np.r_[f, v]))


def validation_gap(model, reference, attack='svc'):
  """{term: |gap|, 'val_gap': mean} from `model`'s {member_auc, forget_auc, forget_f1,
  val_auc, val_f1[, svc_forget]} and the original's `reference` {val_auc, val_f1[, svc_val]}.
  `attack` picks the MIA term ('svc' or 'auc', module docstring); gap_member_auc is always
  given (the stopping rule's chance test). A non-finite term makes the gap inf (a diverged
  model is never the best)."""
  if attack not in ATTACKS:
    raise ValueError(f'stop.attack must be one of {ATTACKS}, got {attack!r}')
  member = abs(model['member_auc'] - 0.5)
  mia_term = ({'gap_svc': abs(model['svc_forget'] - reference['svc_val'])} if attack == 'svc'
              else {'gap_member_auc': member})
  terms = {
      **mia_term,
      'gap_forget_auc': abs(model['forget_auc'] - reference['val_auc']),
      'gap_forget_f1': abs(model['forget_f1'] - reference['val_f1']),
      'gap_val_auc': abs(model['val_auc'] - reference['val_auc']),
      'gap_val_f1': abs(model['val_f1'] - reference['val_f1']),
  }
  values = list(terms.values())
  gaps = {'gap_member_auc': member, **terms}
  gaps['val_gap'] = (float(np.mean(values)) if all(math.isfinite(g) for g in values)
                     else math.inf)
  return gaps


def chance_band(n_forget, n_val, z=1.96):
  """Half-width of the two-sided band of the member AUC under "forget and validation losses
  are exchangeable": z * sqrt((n1 + n2 + 1) / (12 n1 n2)), the Mann-Whitney null's SD."""
  n1, n2 = float(n_forget), float(n_val)
  return float(z) * math.sqrt((n1 + n2 + 1.0) / (12.0 * n1 * n2))


def rate_band(rate, n_forget, n_val, z=1.96):
  """Half-width of the band of the difference of two member rates (forget, validation) drawn
  from one rate: z * sqrt(p (1 - p) (1/n1 + 1/n2)), the two-proportion null's SD, with p
  shrunk as (p n2 + 1) / (n2 + 2) so that a rate of 0 or 1 still leaves a band."""
  n2 = float(n_val)
  p = (min(max(float(rate), 0.0), 1.0) * n2 + 1.0) / (n2 + 2.0)
  return float(z) * math.sqrt(p * (1.0 - p) * (1.0 / float(n_forget) + 1.0 / float(n_val)))


def retain_sample(retain_idx, size, seed=0):
  """A fixed sample of `size` retain images (sorted; all of them when there are fewer),
  drawn by np.random.default_rng([seed, rng.MONITOR_RETAIN])."""
  retain_idx = np.asarray(retain_idx)
  if len(retain_idx) <= size:
    return retain_idx
  pick = np.random.default_rng([int(seed), rng_lib.MONITOR_RETAIN]).choice(
      len(retain_idx), size=int(size), replace=False)
  return retain_idx[np.sort(pick)]


class ValidationMonitor:
  """Scores variables by their validation gap: forwards only (eval mode), on the forget and
  validation sets (and, for the 'svc' attack, a fixed retain sample). Called by the loop after
  every epoch, so it must stay cheap."""

  def __init__(self, apply_fn, source, split, labels, head='image', batch_size=128,
               attack='svc', retain_images=1024, seed=0):
    if len(split.val_idx) == 0:
      raise ValueError('the validation rule needs validation non-members: set '
                       'data.val_fraction > 0 (or stop.rule="none")')
    self.predict = make_predict_fn(apply_fn, head)
    self.source, self.batch_size, self.attack = source, int(batch_size), attack
    self.sets = {'forget': np.asarray(split.forget_idx), 'val': np.asarray(split.val_idx)}
    self.retain_weight = None
    if attack == 'svc':
      if int(retain_images) < 1 or len(split.retain_idx) == 0:
        raise ValueError('stop.attack=svc needs retain images: stop.retain_images >= 1 and a '
                         'non-empty retain set (or stop.attack=auc)')
      self.sets['retain'] = retain_sample(split.retain_idx, int(retain_images), seed)
      # the evaluation's attack sees every retain image against the test set: keep its balance
      non_members = len(split.test_idx) or len(split.val_idx)
      self.retain_weight = (len(split.retain_idx) / non_members * len(split.val_idx)
                            / len(self.sets['retain']))
    self.labels = np.asarray(labels)
    self.reference = None

  @property
  def rows(self):
    """Images one score forwards (its cost against an example budget)."""
    return int(sum(len(idx) for idx in self.sets.values()))

  def measure(self, variables):
    """{member_auc, forget_auc, forget_f1, val_auc, val_f1[, svc_forget, svc_val,
    retain_acc]} of one model."""
    out = {}
    losses = {}
    for name, idx in self.sets.items():
      logits = predict_logits(self.predict, variables, self.source, idx, self.batch_size)
      losses[name] = per_sample_ce(logits, self.labels[idx])
      if name == 'retain':
        out['retain_acc'] = float(np.mean(np.argmax(logits, -1) == self.labels[idx]))
        continue
      metrics = classification_metrics(logits, self.labels[idx])
      out[f'{name}_auc'], out[f'{name}_f1'] = metrics['auc'], metrics['f1']
    out['member_auc'] = member_auc(losses['forget'], losses['val'])
    if self.attack == 'svc':
      svc = svc_mia(losses['retain'], losses['val'], losses['forget'], return_details=True,
                    retain_weight=self.retain_weight)
      out['svc_forget'], out['svc_val'] = svc['forget_member_rate'], svc['test_member_rate']
    return out

  def at_chance(self, scores, z=1.96):
    """The membership attacks cannot tell forget from validation patients (within their
    nulls' `z` bands): the stopping rule's goal. With 'svc', the SVC must also call forget
    images members as often as it calls the original's non-members."""
    n_forget, n_val = len(self.sets['forget']), len(self.sets['val'])
    ok = scores['gap_member_auc'] <= chance_band(n_forget, n_val, z)
    if self.attack == 'svc':
      ok = ok and scores['gap_svc'] <= rate_band(self.reference['svc_val'], n_forget, n_val, z)
    return bool(ok)

  def set_reference(self, original):
    self.reference = self.measure(original)
    return self.reference

  def __call__(self, variables):
    """The score dict of one model: its measurements, the gaps and 'val_gap'."""
    if self.reference is None:
      raise RuntimeError('ValidationMonitor: set_reference(original) first')
    measured = self.measure(variables)
    return {**measured, **validation_gap(measured, self.reference, self.attack)}
