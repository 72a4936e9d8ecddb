"""The audit report of one forget request: what was forgotten, with which weights, and evidence.

Why: whoever answers a patient's request to be forgotten must show, per patient, that the
unlearned model no longer singles their examples out as training data, which weights went in
and came out (SHA-256), what it cost (wall time, retain/test utility) and, as plainly, what the
evidence does not prove. The runner computes per-example losses with the project's evaluator;
this module turns them into the evidence and writes
  DIR/forget_report.json  (the contract; change only additively),
  DIR/forget_report.md    (counts, ids, hashes, the evidence table, the caveats),
  DIR/forget_exposure.png (per-patient member probability before vs after).

Evidence: a loss-based membership attack in the form of `mia.logreg_mia` (class-balanced
logistic regression on [loss, log loss]) is fitted per model on members = retain losses and
non-members = the given reference losses (validation non-members, or the TEST set standing in
for them; the report records which). Each forget example gets the attack's member probability
under the original model and under the unlearned one; a patient is as exposed as their most
exposed image (max), with the mean beside it. Nothing here sees report text or pixels; the
outputs hold numbers, subject ids and hashes only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Mapping

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from forgetmi_jax.evaluation import mia
from forgetmi_jax.evaluation.report import format_value, markdown_table, write_json_atomic
from forgetmi_jax.io_utils import atomic_write

REPORT_JSON = 'forget_report.json'
REPORT_MD = 'forget_report.md'
EXPOSURE_PNG = 'forget_exposure.png'
REPORT_VERSION = 1
LOSS_SETS = ('forget', 'retain', 'nonmember')
NONMEMBER_SETS = ('validation', 'test')
REQUIRED_KEYS = ('n_subjects', 'n_studies', 'n_images', 'sha256_original', 'sha256_unlearned',
                 'seconds', 'per_patient')
# Keys of `load_forget_request`'s summary copied into the report (counts, ids and a hash; the
# request's file name is left out: it may name a person).
REQUEST_KEYS = ('request_sha256', 'n_rows', 'n_listed', 'duplicates', 'n_duplicate_rows',
                'without_images', 'n_other_columns', 'warnings')

CAVEATS = (
    'It shows that, under this attack (a logistic regression on per-example losses, fitted '
    "on the model's own retain examples as members and the reference set as non-members), the "
    "unlearned model treats these patients' examples like examples it never saw, to the "
    'extent given by the numbers above.',
    'It is no proof of exact unlearning: only a model retrained without these patients is '
    'guaranteed to hold nothing of them, and only a comparison with such a model (or a '
    'certified method) could show equivalence. The unlearned weights are a fine-tuned copy '
    'of the original and may still encode these patients in ways a loss attack cannot see '
    '(embeddings, the text head, stronger or white-box attacks).',
    'A low member probability is what a patient who was never in the training set would '
    'also get; it cannot tell forgotten from never-learned, and the attack itself may be '
    'weak (see its AUC on retain vs reference examples: near 0.5 means the attack could not '
    'tell members at all, even before unlearning, and then a low probability shows little).',
    'The numbers are per image, aggregated per patient; they say nothing about copies of '
    'the data, other models, logs or backups outside these weights.',
)


# ------------------------------------------------------------------------------- weights

def _leaves(tree, path=()):
  if isinstance(tree, Mapping):
    for key in tree:
      yield from _leaves(tree[key], path + (str(key),))
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from _leaves(value, path + (str(i),))
  elif tree is not None:
    yield path, tree


def _field(h, data: bytes):
  h.update(len(data).to_bytes(8, 'little'))
  h.update(data)


def sha256_of_variables(variables) -> str:
  """Hex SHA-256 of a {'params', 'batch_stats'} variables pytree, independent of key order.

  Every array leaf contributes its path (sorted), dtype name, shape and little-endian bytes,
  each length-prefixed, so the hash changes exactly when some value, dtype, shape or name
  changes, never with dict insertion order, device or sharding. Empty containers add nothing.
  Leaves must be fetchable to this host (replicated or host-local arrays, numpy arrays).
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f'sha256_of_variables needs a mapping of collections, got '
                    f'{type(variables).__name__}')
  h = hashlib.sha256(b'forgetmi-jax variables v1')
  for path, leaf in sorted(_leaves(variables), key=lambda item: item[0]):
    a = np.asarray(jax.device_get(leaf))
    if a.dtype.byteorder == '>':
      a = a.byteswap().view(a.dtype.newbyteorder('<'))
    _field(h, json.dumps(list(path)).encode('utf-8'))
    _field(h, a.dtype.name.encode('ascii'))
    _field(h, json.dumps(list(a.shape)).encode('ascii'))
    _field(h, np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------- evidence

def _clean_losses(x, name) -> np.ndarray:
  """Float64 losses [N] as the attacks of `mia` take them: nan / -inf refused, +inf clipped."""
  a = np.asarray(x, dtype=np.float64).reshape(-1)
  bad = int(np.sum(np.isnan(a) | (a == -np.inf)))
  if a.size == 0 or bad:
    raise ValueError(f'{name} losses must be non-empty, without nan or -inf ({a.size} values, '
                     f'{bad} nan or -inf)')
  return np.clip(a, -mia.LOSS_CLIP, mia.LOSS_CLIP)


def member_probability(member_losses, nonmember_losses, query_losses) -> np.ndarray:
  """P(member) of each query loss under the attack of `mia.logreg_mia`, fitted once on all.

  Class-balanced logistic regression (standardised [loss, log loss]) on members (1) vs
  non-members (0); with balanced weights 0.5 means "as likely either way". The query
  examples (the forget set) are in neither training set, so one fit on everything is honest.
  """
  members = _clean_losses(member_losses, 'member')
  nonmembers = _clean_losses(nonmember_losses, 'non-member')
  query = _clean_losses(query_losses, 'query')
  if members.size < 2 or nonmembers.size < 2:
    raise ValueError('member_probability needs at least 2 member and 2 non-member losses')
  features = mia._features  # pylint: disable=protected-access
  x = features(np.concatenate([members, nonmembers]))
  y = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)]).astype(np.int64)
  clf = make_pipeline(StandardScaler(),
                      LogisticRegression(class_weight='balanced', max_iter=1000))
  clf.fit(x, y)
  return clf.predict_proba(features(query))[:, 1]


def per_patient_exposure(subject_ids, p_before, p_after, loss_before, loss_after) -> list:
  """One row per patient (ascending id): images, max and mean P(member), mean loss and shift."""
  sid = np.asarray(subject_ids, np.int64).reshape(-1)
  cols = {'p_before': p_before, 'p_after': p_after, 'loss_before': loss_before,
          'loss_after': loss_after}
  cols = {k: np.asarray(v, np.float64).reshape(-1) for k, v in cols.items()}
  for k, v in cols.items():
    if v.size != sid.size:
      raise ValueError(f'{k} has {v.size} values for {sid.size} forget examples')
  rows = []
  for s in np.unique(sid):
    m = sid == s
    pb, pa = cols['p_before'][m], cols['p_after'][m]
    lb, la = cols['loss_before'][m], cols['loss_after'][m]
    rows.append({
        'subject_id': int(s), 'n_images': int(m.sum()),
        'p_member_before_max': float(pb.max()), 'p_member_after_max': float(pa.max()),
        'p_member_before_mean': float(pb.mean()), 'p_member_after_mean': float(pa.mean()),
        'loss_before_mean': float(lb.mean()), 'loss_after_mean': float(la.mean()),
        'loss_shift_mean': float((la - lb).mean()),
    })
  return rows


def _loss_sets(losses, model):
  if not isinstance(losses, Mapping):
    raise TypeError(f'losses_{model} must map {LOSS_SETS} to arrays')
  missing = [k for k in LOSS_SETS if k not in losses]
  if missing:
    raise ValueError(f'losses_{model} lacks {missing} (needs {list(LOSS_SETS)})')
  return {k: _clean_losses(losses[k], f'losses_{model}[{k!r}]') for k in LOSS_SETS}


def _flat_metrics(d, prefix=''):
  out = {}
  for k, v in (d or {}).items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flat_metrics(v, key + '/'))
    elif isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)):
      out[key] = float(v)
  return out


def _attack(losses, seed, include_svc):
  lr = mia.logreg_mia(losses['retain'], losses['nonmember'], losses['forget'], seed=seed)
  out = {'logreg': lr}
  if include_svc:
    out['svc'] = mia.svc_mia(losses['retain'], losses['nonmember'], losses['forget'],
                             seed=seed, return_details=True)
  return out


def build_forget_report(*, forget_subject_ids, forget_study_ids, losses_original,
                        losses_unlearned, sha256_original: str, sha256_unlearned: str,
                        seconds: float, nonmember_set: str = 'test', utility_before=None,
                        utility_after=None, request_summary=None, method: str | None = None,
                        config=None, config_fingerprint: str | None = None, seed: int = 0,
                        include_svc: bool = True) -> dict:
  """The report payload (plain JSON types) for `write_forget_report`.

  forget_subject_ids, forget_study_ids: per forget image, aligned with the 'forget' losses.
  losses_original, losses_unlearned: {'forget', 'retain', 'nonmember'} per-example losses of
    each model (same examples, same order, for both models).
  nonmember_set: which examples the 'nonmember' losses are ('validation', or 'test' standing
    in for validation non-members when the config has none).
  utility_before / utility_after: metrics of the original / unlearned model, e.g.
    {'retain': {'auc': .., 'f1': ..}, 'test': {...}}; numbers only are kept, flattened.
  request_summary: `load_forget_request(...).summary` (its counts, ids and hash are kept).
  seconds: wall time of the request (unlearning and evaluation), as the runner measured it.
  Losses with nan or -inf (a diverged model) are refused; +inf is clipped to mia.LOSS_CLIP.
  """
  if nonmember_set not in NONMEMBER_SETS:
    raise ValueError(f'nonmember_set must be one of {NONMEMBER_SETS}, got {nonmember_set!r}')
  before = _loss_sets(losses_original, 'original')
  after = _loss_sets(losses_unlearned, 'unlearned')
  for k in LOSS_SETS:
    if before[k].size != after[k].size:
      raise ValueError(f'{k!r} losses: {before[k].size} for the original model, '
                       f'{after[k].size} for the unlearned one')
  sid = np.asarray(forget_subject_ids, np.int64).reshape(-1)
  study = np.asarray(forget_study_ids, np.int64).reshape(-1)
  if sid.size != before['forget'].size or study.size != sid.size:
    raise ValueError(f'{sid.size} subject ids and {study.size} study ids for '
                     f'{before["forget"].size} forget losses')
  p = {}
  for name, losses in (('before', before), ('after', after)):
    p[name] = {s: member_probability(losses['retain'], losses['nonmember'], losses[s])
               for s in LOSS_SETS}
  per_patient = per_patient_exposure(sid, p['before']['forget'], p['after']['forget'],
                                     before['forget'], after['forget'])

  def side(name, losses):
    q = p[name]
    worst = np.asarray([r[f'p_member_{name}_max'] for r in per_patient])
    return {
        'p_member_forget_mean': float(q['forget'].mean()),
        'member_rate_forget': float((q['forget'] > 0.5).mean()),
        'p_member_retain_mean': float(q['retain'].mean()),
        'p_member_nonmember_mean': float(q['nonmember'].mean()),
        'patients_exposed': int((worst > 0.5).sum()),
        'p_member_patient_max_mean': float(worst.mean()),
        'loss_forget_mean': float(losses['forget'].mean()),
        'loss_retain_mean': float(losses['retain'].mean()),
        'loss_nonmember_mean': float(losses['nonmember'].mean()),
        'attack': _attack(losses, seed, include_svc),
    }

  shift = after['forget'] - before['forget']
  payload = {
      'version': REPORT_VERSION,
      'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'method': method,
      'n_subjects': int(np.unique(sid).size),
      'n_studies': int(np.unique(study).size),
      'n_images': int(sid.size),
      'subject_ids': np.unique(sid).tolist(),
      'sha256_original': str(sha256_original),
      'sha256_unlearned': str(sha256_unlearned),
      'weights_changed': str(sha256_original) != str(sha256_unlearned),
      'seconds': float(seconds),
      'nonmember_set': nonmember_set,
      'n_retain': int(before['retain'].size),
      'n_nonmember': int(before['nonmember'].size),
      'evidence': {'before': side('before', before), 'after': side('after', after),
                   'loss_shift_mean': float(shift.mean()),
                   'loss_shift_median': float(np.median(shift))},
      'per_patient': per_patient,
      'utility': {'before': _flat_metrics(utility_before), 'after': _flat_metrics(utility_after)},
  }
  if request_summary is not None:
    payload['request'] = {k: request_summary[k] for k in REQUEST_KEYS if k in request_summary}
  if config_fingerprint is not None:
    payload['config_fingerprint'] = str(config_fingerprint)
  if config is not None:
    payload['config'] = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return payload


# ------------------------------------------------------------------------------- outputs

def _markdown(payload) -> str:
  ev = payload.get('evidence', {})
  b, a = ev.get('before', {}), ev.get('after', {})
  req = payload.get('request', {})
  method = f' ({payload["method"]})' if payload.get('method') else ''
  lines = [f'# Forget request report{method}', '',
           'Counts, subject ids, hashes and loss-based evidence only: no names, report text or '
           'pixels.', '',
           '## Request', '']
  if req:
    lines += [f'- rows listed: {req.get("n_rows")}; distinct subjects: {req.get("n_listed")}; '
              f'duplicate rows merged: {req.get("n_duplicate_rows", 0)}; '
              f'listed without images: {len(req.get("without_images", []))}',
              f'- request file SHA-256: `{req.get("request_sha256")}`']
    lines += [f'- note: {w}' for w in req.get('warnings', [])]
  lines += [f'- forgotten: {payload["n_subjects"]} patients, {payload["n_studies"]} studies, '
            f'{payload["n_images"]} images',
            f'- retain examples: {payload.get("n_retain")}; non-member reference: '
            f'{payload.get("n_nonmember")} {payload.get("nonmember_set")} examples'
            + (' (TEST standing in for validation non-members)'
               if payload.get('nonmember_set') == 'test' else ''),
            f'- config fingerprint: `{payload.get("config_fingerprint", "—")}`',
            f'- weights in (original) SHA-256: `{payload["sha256_original"]}`',
            f'- weights out (unlearned) SHA-256: `{payload["sha256_unlearned"]}`'
            + ('' if payload.get('weights_changed', True) else ' (UNCHANGED)'),
            f'- wall time: {format_value(payload["seconds"], 1)} s', '']
  if b and a:
    def row(label, key):
      return [label, b.get(key), a.get(key)]

    def attack(key, sub='logreg'):
      return [b['attack'].get(sub, {}).get(key), a['attack'].get(sub, {}).get(key)]
    rows = [row('mean P(member), forget images', 'p_member_forget_mean'),
            row('forget images with P(member) > 0.5', 'member_rate_forget'),
            row('mean over patients of max P(member)', 'p_member_patient_max_mean'),
            row('patients with max P(member) > 0.5', 'patients_exposed'),
            row('mean P(member), retain (members)', 'p_member_retain_mean'),
            row('mean P(member), non-member reference', 'p_member_nonmember_mean'),
            row('mean loss, forget', 'loss_forget_mean'),
            row('mean loss, retain', 'loss_retain_mean'),
            row('mean loss, non-member reference', 'loss_nonmember_mean'),
            ['attack AUC, retain vs reference (5-fold)'] + attack('attack_auc'),
            ['AUC forget vs reference'] + attack('forget_vs_test_auc')]
    if 'svc' in b['attack']:
      rows.append(['paper MIA (SVC): forget called member'] + attack('score', 'svc'))
    lines += ['## Evidence', '',
              'Membership attack fitted per model: members = retain, non-members = the '
              'reference set. Lower P(member) on forget images = treated more like unseen data.',
              '', markdown_table(['', 'original', 'unlearned'], rows),
              f'Mean loss shift on forget images (unlearned - original): '
              f'{format_value(ev.get("loss_shift_mean"))} '
              f'(median {format_value(ev.get("loss_shift_median"))}).', '']
  pp = payload.get('per_patient', [])
  if pp:
    rows = [[r['subject_id'], r['n_images'], r['p_member_before_max'], r['p_member_after_max'],
             r['p_member_before_mean'], r['p_member_after_mean'], r['loss_shift_mean']]
            for r in pp]
    lines += ['## Per patient', '',
              'A patient is as exposed as their most exposed image (max); the mean is beside it.',
              '', markdown_table(['subject', 'images', 'max P before', 'max P after',
                                  'mean P before', 'mean P after', 'loss shift'], rows),
              f'![per-patient member probability]({EXPOSURE_PNG})', '']
  utility = payload.get('utility', {})
  ub, ua = utility.get('before', {}), utility.get('after', {})
  keys = sorted(set(ub) | set(ua))
  if keys:
    rows = [[k, ub.get(k), ua.get(k),
             (ua[k] - ub[k]) if k in ua and k in ub else None] for k in keys]
    lines += ['## Utility', '', markdown_table(['metric', 'original', 'unlearned', 'change'],
                                               rows)]
  lines += ['## What this evidence does and does not prove', '']
  lines += [f'- {c}' for c in CAVEATS]
  return '\n'.join(lines) + '\n'


def plot_exposure(per_patient, path) -> str:
  """Per-patient member probability before vs after: a slope chart (max) and a scatter."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not per_patient:
    raise ValueError('plot_exposure needs at least one patient')
  bmax = np.asarray([r['p_member_before_max'] for r in per_patient])
  amax = np.asarray([r['p_member_after_max'] for r in per_patient])
  bmean = np.asarray([r['p_member_before_mean'] for r in per_patient])
  amean = np.asarray([r['p_member_after_mean'] for r in per_patient])
  fig = Figure(figsize=(9.5, 4.0), layout='constrained')
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  for y0, y1 in zip(bmax, amax):
    left.plot([0, 1], [y0, y1], color='#1f77b4' if y1 < y0 else '#d62728', alpha=0.5, lw=1)
  left.scatter(np.zeros_like(bmax), bmax, s=12, color='k', zorder=3)
  left.scatter(np.ones_like(amax), amax, s=12, color='k', zorder=3)
  left.axhline(0.5, color='grey', ls='--', lw=1)
  left.set_xticks([0, 1], ['original', 'unlearned'])
  left.set_xlim(-0.3, 1.3)
  left.set_ylim(-0.02, 1.02)
  left.set_ylabel('max P(member) over the patient\'s images')
  left.set_title(f'{len(per_patient)} patients (blue: lower after, red: higher)')
  right.plot([0, 1], [0, 1], color='grey', lw=1)
  right.axhline(0.5, color='grey', ls='--', lw=1)
  right.axvline(0.5, color='grey', ls='--', lw=1)
  right.scatter(bmax, amax, s=18, label='max over images')
  right.scatter(bmean, amean, s=18, facecolors='none', edgecolors='#ff7f0e',
                label='mean over images')
  right.set_xlim(-0.02, 1.02)
  right.set_ylim(-0.02, 1.02)
  right.set_xlabel('P(member), original model')
  right.set_ylabel('P(member), unlearned model')
  right.legend(fontsize=8, frameon=False, loc='upper left')
  right.set_title('per patient: below the diagonal = less exposed')
  atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110))
  return os.fspath(path)


def write_forget_report(payload, workdir) -> dict:
  """Write forget_report.json, forget_report.md and forget_exposure.png (atomically) in workdir.

  Returns {'json', 'md', 'png'} paths. Raises ValueError naming missing required keys.
  """
  missing = [k for k in REQUIRED_KEYS if k not in payload]
  if missing:
    raise ValueError(f'forget report payload lacks {missing}')
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  paths = {'json': os.path.join(workdir, REPORT_JSON), 'md': os.path.join(workdir, REPORT_MD),
           'png': os.path.join(workdir, EXPOSURE_PNG)}
  write_json_atomic(payload, paths['json'])
  text = _markdown(payload)
  atomic_write(paths['md'], lambda f: f.write(text.encode('utf-8')))
  plot_exposure(payload['per_patient'], paths['png'])
  return paths
