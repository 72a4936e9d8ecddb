"""The forget report: weight hashes, per-patient attack evidence (vs sklearn) and privacy."""
import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from forgetmi_jax.data.forget_request import load_forget_request
from forgetmi_jax.data.synthetic import make_synthetic_cohort
from forgetmi_jax.evaluation import forget_report as fr

CANARY = 'Quorblefax'


def variables():
  return {'params': {'enc': {'kernel': jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
                             'bias': jnp.zeros(3, jnp.float32)},
                     'head': {'kernel': jnp.ones((3, 4), jnp.bfloat16)}},
          'batch_stats': {'bn': {'mean': np.full(3, 0.5, np.float32),
                                 'var': np.ones(3, np.float32)}}}


def test_sha256_of_variables():
  base = fr.sha256_of_variables(variables())
  assert len(base) == 64 and int(base, 16) >= 0
  # An identical copy (numpy instead of jax, other key order) hashes the same.
  v = variables()
  copy = {'batch_stats': {'bn': {'var': np.array(v['batch_stats']['bn']['var']),
                                 'mean': np.array(v['batch_stats']['bn']['mean'])}},
          'params': {'head': {'kernel': np.asarray(v['params']['head']['kernel'])},
                     'enc': {'bias': np.asarray(v['params']['enc']['bias']),
                             'kernel': np.asarray(v['params']['enc']['kernel'])}}}
  assert fr.sha256_of_variables(copy) == base
  # One element of one leaf changes the hash, and so do dtype, shape and a name.
  changed = variables()
  changed['params']['enc']['kernel'] = changed['params']['enc']['kernel'].at[1, 2].add(1e-6)
  changed_bs = variables()
  changed_bs['batch_stats']['bn']['var'][0] = 1.0 + 2**-20
  as_f64 = variables()
  as_f64['batch_stats']['bn']['mean'] = as_f64['batch_stats']['bn']['mean'].astype(np.float64)
  reshaped = variables()
  reshaped['params']['enc']['kernel'] = reshaped['params']['enc']['kernel'].reshape(3, 2)
  renamed = variables()
  renamed['params']['enc']['w'] = renamed['params']['enc'].pop('kernel')
  hashes = [fr.sha256_of_variables(t) for t in (changed, changed_bs, as_f64, reshaped, renamed)]
  assert len(set(hashes + [base])) == 6
  with pytest.raises(TypeError):
    fr.sha256_of_variables([1, 2])


def sklearn_member_probability(members, nonmembers, query):
  """Independent: hand-made features, standardisation and balanced sample weights."""
  def feats(l):
    l = np.asarray(l, np.float64)
    return np.stack([l, np.log(np.maximum(l, 1e-12))], 1)
  x = feats(np.concatenate([members, nonmembers]))
  y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
  mu, sd = x.mean(0), x.std(0)
  w = np.where(y == 1, len(y) / (2 * len(members)), len(y) / (2 * len(nonmembers)))
  clf = LogisticRegression(max_iter=1000, tol=1e-10).fit((x - mu) / sd, y, sample_weight=w)
  return clf.predict_proba((feats(query) - mu) / sd)[:, 1]


def test_member_probability_matches_sklearn():
  rng = np.random.default_rng(0)
  members, nonmembers = rng.exponential(0.1, 300), rng.exponential(1.0, 60)
  query = np.r_[rng.exponential(0.1, 20), rng.exponential(1.0, 20)]
  p = fr.member_probability(members, nonmembers, query)
  np.testing.assert_allclose(p, sklearn_member_probability(members, nonmembers, query),
                             atol=1e-4)
  assert p[:20].mean() > 0.6 > 0.4 > p[20:].mean()


@pytest.fixture(scope='module')
def case(tmp_path_factory):
  """A request of 4 patients on the synthetic cohort, with a canary planted in the report
  text of a forgotten patient and in an ignored column of the request."""
  tmp = tmp_path_factory.mktemp('case')
  cohort = make_synthetic_cohort(seed=0, image_size=16, num_subjects=40)
  train = np.unique(cohort.subject_id[~cohort.is_test])
  chosen = [int(s) for s in train[[1, 4, 9, 20]]]
  first = int(np.flatnonzero(cohort.subject_id == chosen[0])[0])
  cohort.reports = list(cohort.reports)
  planted = f'findings : {CANARY} opacity in the left base .'
  for i in np.flatnonzero(cohort.study_id == cohort.study_id[first]):
    cohort.reports[i] = planted
  req = tmp / 'request.csv'
  req.write_text('subject_id,comment\n' + ''.join(f'{s},{CANARY} asked\n' for s in chosen)
                 + f'{chosen[1]},dup\n')
  split, summary = load_forget_request(req, cohort)
  rng = np.random.default_rng(1)
  nf, nr, nt = len(split.forget_idx), len(split.retain_idx), len(split.test_idx)
  # Original: forget examples memorised like retain; unlearned: forget looks like test.
  original = {'forget': rng.exponential(0.05, nf), 'retain': rng.exponential(0.05, nr),
              'nonmember': rng.exponential(1.2, nt)}
  unlearned = {'forget': rng.exponential(1.0, nf), 'retain': rng.exponential(0.08, nr),
               'nonmember': rng.exponential(1.3, nt)}
  config = ml_collections.ConfigDict({'seed': 0, 'method': 'forgetmi',
                                      'data': {'request_csv': str(req), 'image_size': 16}})
  payload = fr.build_forget_report(
      forget_subject_ids=cohort.subject_id[split.forget_idx],
      forget_study_ids=cohort.study_id[split.forget_idx],
      losses_original=original, losses_unlearned=unlearned,
      sha256_original=fr.sha256_of_variables(variables()),
      sha256_unlearned='0' * 64, seconds=12.5, nonmember_set='test',
      utility_before={'retain': {'auc': 0.99, 'f1': 0.95}, 'test': {'auc': 0.66}},
      utility_after={'retain': {'auc': 0.97, 'f1': 0.9}, 'test': {'auc': 0.64, 'note': 'x'}},
      request_summary=summary, method='forgetmi', config=config, config_fingerprint='abc123',
      include_svc=True)
  out = tmp / 'report'
  paths = fr.write_forget_report(payload, out)
  return dict(cohort=cohort, split=split, summary=summary, chosen=chosen, original=original,
              unlearned=unlearned, payload=payload, paths=paths, out=out, first=first,
              planted=planted)


def test_report_files_and_json_keys(case):
  paths, out = case['paths'], case['out']
  assert sorted(os.listdir(out)) == sorted([fr.REPORT_JSON, fr.REPORT_MD, fr.EXPOSURE_PNG])
  with open(paths['json']) as f:
    js = json.load(f)
  for key in fr.REQUIRED_KEYS + ('config_fingerprint', 'config', 'evidence', 'utility',
                                 'nonmember_set', 'request'):
    assert key in js, key
  split = case['split']
  assert js['n_subjects'] == 4 and js['n_images'] == len(split.forget_idx)
  assert js['n_studies'] == len(np.unique(case['cohort'].study_id[split.forget_idx]))
  assert js['n_studies'] == case['summary']['n_studies']
  assert js['sha256_original'] == fr.sha256_of_variables(variables())
  assert js['weights_changed'] is True and js['seconds'] == 12.5
  assert js['config']['data']['image_size'] == 16 and js['config_fingerprint'] == 'abc123'
  assert js['request']['n_duplicate_rows'] == 1 and js['request']['duplicates'] == [
      case['chosen'][1]]
  assert js['utility']['after'] == {'retain/auc': 0.97, 'retain/f1': 0.9, 'test/auc': 0.64}
  assert js['nonmember_set'] == 'test'
  assert set(js['evidence']['before']['attack']) == {'logreg', 'svc'}
  md = open(paths['md'], encoding='utf-8').read()
  for s in (js['sha256_original'], '0' * 64, 'abc123', '4 patients',
            f'{js["n_studies"]} studies', 'no proof of exact unlearning', 'retrained'):
    assert s in md, s
  assert open(paths['png'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_per_patient_numbers_match_sklearn(case):
  sid = case['cohort'].subject_id[case['split'].forget_idx]
  o, u = case['original'], case['unlearned']
  pb = sklearn_member_probability(o['retain'], o['nonmember'], o['forget'])
  pa = sklearn_member_probability(u['retain'], u['nonmember'], u['forget'])
  pp = case['payload']['per_patient']
  assert [r['subject_id'] for r in pp] == sorted(case['chosen'])
  for r in pp:
    m = sid == r['subject_id']
    assert r['n_images'] == m.sum()
    np.testing.assert_allclose(r['p_member_before_max'], pb[m].max(), atol=1e-4)
    np.testing.assert_allclose(r['p_member_after_max'], pa[m].max(), atol=1e-4)
    np.testing.assert_allclose(r['p_member_before_mean'], pb[m].mean(), atol=1e-4)
    np.testing.assert_allclose(r['p_member_after_mean'], pa[m].mean(), atol=1e-4)
    np.testing.assert_allclose(r['loss_shift_mean'], (u['forget'][m] - o['forget'][m]).mean(),
                               rtol=1e-12)
    # The planted regime: exposed before, much less after.
    assert r['p_member_before_max'] > 0.5 and r['p_member_after_max'] < r['p_member_before_max']
  ev = case['payload']['evidence']
  np.testing.assert_allclose(ev['loss_shift_mean'], (u['forget'] - o['forget']).mean())
  np.testing.assert_allclose(ev['before']['member_rate_forget'], (pb > 0.5).mean())
  np.testing.assert_allclose(ev['after']['member_rate_forget'], (pa > 0.5).mean())
  assert ev['before']['patients_exposed'] == 4


def test_no_text_or_pixels_in_outputs(case):
  cohort, first = case['cohort'], case['first']
  assert CANARY in cohort.reports[first]  # the canary is really in the data
  pixels = np.asarray(cohort.get_images([first]), np.float32).reshape(-1)
  needles = [CANARY.encode(), CANARY.lower().encode(), case['planted'][:24].encode(),
             pixels[40:48].tobytes(), pixels[100:108].astype(np.float64).tobytes()]
  for path in case['paths'].values():
    data = open(path, 'rb').read()
    for needle in needles:
      assert needle not in data, (path, needle[:12])
  assert CANARY not in json.dumps(case['summary'])


def test_input_checks(case, tmp_path):
  o, u = case['original'], case['unlearned']
  sid = case['cohort'].subject_id[case['split'].forget_idx]
  kw = dict(forget_subject_ids=sid, forget_study_ids=sid, losses_original=o,
            losses_unlearned=u, sha256_original='a', sha256_unlearned='a', seconds=1.0,
            include_svc=False)
  with pytest.raises(ValueError, match='nonmember_set'):
    fr.build_forget_report(**{**kw, 'nonmember_set': 'retain'})
  with pytest.raises(ValueError, match="lacks \\['nonmember'\\]"):
    fr.build_forget_report(**{**kw, 'losses_unlearned': {'forget': u['forget'],
                                                         'retain': u['retain']}})
  bad = dict(u, forget=np.r_[u['forget'][:-1], np.nan])
  with pytest.raises(ValueError, match="losses_unlearned\\['forget'\\].*1 nan or -inf"):
    fr.build_forget_report(**{**kw, 'losses_unlearned': bad})
  with_inf = dict(u, forget=np.r_[u['forget'][:-1], np.inf])
  p_inf = fr.build_forget_report(**{**kw, 'losses_unlearned': with_inf})
  mean = p_inf['evidence']['after']['loss_forget_mean']  # +inf is clipped, not refused
  assert np.isfinite(mean) and mean >= 1e6 / len(sid)
  with pytest.raises(ValueError, match='subject ids'):
    fr.build_forget_report(**{**kw, 'forget_subject_ids': sid[:-1]})
  payload = fr.build_forget_report(**kw)
  assert payload['weights_changed'] is False and 'config' not in payload
  assert 'svc' not in payload['evidence']['after']['attack']
  fr.write_forget_report(payload, tmp_path)
  assert '(UNCHANGED)' in open(tmp_path / fr.REPORT_MD).read()
  with pytest.raises(ValueError, match='per_patient'):
    fr.write_forget_report({k: v for k, v in payload.items() if k != 'per_patient'}, tmp_path)
