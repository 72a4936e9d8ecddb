"""The main command end to end on the tiny config: metrics.json recomputed independently
(sklearn) from the per-example outputs; a rerun with other settings is a new run, never the old
model; the same config resumes its finished checkpoint; a canary word planted in one patient's
report appears in no log line, output file or cache file."""
import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.svm import SVC

from forgetmi_jax.data import synthetic
from forgetmi_jax.runs import setup, unlearn
from forgetmi_jax.train.checkpoints import CheckpointError
from tests.helpers import tiny_config

CANARY = 'zorbquaxitude'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  make = synthetic.make_synthetic_cohort

  def planted(*args, **kwargs):
    cohort = make(*args, **kwargs)
    first = cohort.subject_id[0]
    reports = list(cohort.reports)
    for i in np.flatnonzero(cohort.subject_id == first):
      reports[i] = reports[i] + f' {CANARY} noted.'
    cohort.reports = reports
    return cohort
  mp = pytest.MonkeyPatch()
  mp.setattr(setup, 'make_synthetic_cohort', planted)
  records = []
  handler = logging.Handler()
  handler.emit = lambda r: records.append(r.getMessage())
  logging.getLogger().addHandler(handler)
  logging.getLogger('forgetmi_jax').setLevel(logging.DEBUG)
  try:
    config = tiny_config(root / 'a')
    first = unlearn.run(config)
    changed = tiny_config(root / 'a', **{'forgetmi.lr': 1e-4, 'forgetmi.setting': 'equal'})
    second = unlearn.run(changed)
    again = unlearn.run(tiny_config(root / 'a'))
  finally:
    mp.undo()
    logging.getLogger().removeHandler(handler)
  return root, first, second, again, records


def test_metrics_json_recomputed_with_sklearn(runs):
  root, _, _, again, _ = runs
  workdir = root / 'a'
  payload = json.loads((workdir / 'metrics.json').read_text())
  arrays = np.load(workdir / 'losses.npz')
  for name, m in payload['models'].items():
    for s, key in (('forget', 'forget'), ('test', 'test')):
      logits, labels = arrays[f'logits/{name}/{s}'], arrays[f'labels/{s}']
      p = softmax(logits.astype(np.float64), axis=1)
      present = np.unique(labels)
      auc = np.mean([roc_auc_score(labels == c, p[:, c]) for c in present])
      f1 = f1_score(labels, logits.argmax(1), average='macro',
                    labels=np.union1d(present, np.unique(logits.argmax(1))))
      assert m[f'{key}_auc'] == pytest.approx(auc, abs=1e-6), (name, s)
      assert m[f'{key}_f1'] == pytest.approx(f1, abs=1e-6), (name, s)
      ce = -np.log(p[np.arange(len(labels)), labels])
      np.testing.assert_allclose(arrays[f'{name}/{s}'], ce, rtol=1e-4, atol=1e-5)
    x = np.concatenate([arrays[f'{name}/retain'], arrays[f'{name}/test']])[:, None]
    y = np.r_[np.ones(len(arrays[f'{name}/retain'])), np.zeros(len(arrays[f'{name}/test']))]
    svc = SVC(C=3, kernel='rbf', gamma='auto').fit(x, y)
    assert m['mia'] == pytest.approx(svc.predict(arrays[f'{name}/forget'][:, None]).mean())
    assert m['mia_test_member_rate'] == pytest.approx(svc.predict(x[y == 0]).mean())
    assert m['n_retain'] == len(arrays[f'{name}/retain'])
    a, b = arrays[f'logits/{name}/retain'], arrays['logits/retrain/retain']
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert m['distance_to_retrain'] == pytest.approx(1 - cos.mean(), abs=1e-5)
  assert payload['models'] == again['models']


def test_rerun_with_other_settings_is_a_new_run(runs):
  root, first, second, again, _ = runs
  f1, f2 = first['fingerprint']['forgetmi'], second['fingerprint']['forgetmi']
  assert f1 != f2
  assert first['models']['forgetmi']['forget_auc'] != second['models']['forgetmi']['forget_auc']
  assert second['config']['forgetmi']['lr'] == 1e-4
  assert first['models']['original'] == second['models']['original']  # the cached original
  assert sorted(os.listdir(root / 'a' / 'checkpoints' / 'forgetmi')) == sorted([f1, f2])
  # the same config again resumes its finished run: no epoch is trained a second time
  assert again['fingerprint']['forgetmi'] == f1
  assert again['models']['forgetmi'] == first['models']['forgetmi']
  assert len(again['history']['forgetmi']) == len(first['history']['forgetmi'])


def test_canary_is_nowhere(runs):
  root, _, _, _, records = runs
  assert records  # the run logged something
  assert not [r for r in records if CANARY in r]
  hits = []
  for path in glob.glob(str(root / '**' / '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        if CANARY.encode() in f.read():
          hits.append(os.path.relpath(path, root))
  assert not hits, hits


def test_evaluate_a_moved_workdir_and_a_truncated_checkpoint(runs, tmp_path):
  root, first, _, _, _ = runs
  moved = tmp_path / 'moved'
  shutil.copytree(root, moved)  # the run and its cache (inside it), moved together
  payload = unlearn.reevaluate(str(moved / 'a'))
  assert payload['models']['forgetmi']['forget_auc'] == first['models']['forgetmi']['forget_auc']
  assert not list((root / 'a').glob('metrics.json.*'))  # nothing written to the old place
  # a truncated checkpoint: one error naming the folder, no retraining
  ckpt = moved / 'a' / 'checkpoints' / 'forgetmi' / first['fingerprint']['forgetmi']
  for path in ckpt.rglob('*'):
    if path.is_file() and path.stat().st_size > 100 and 'DONE' not in path.name:
      path.write_bytes(path.read_bytes()[:50])
  with pytest.raises(CheckpointError, match=str(ckpt)):
    unlearn.reevaluate(str(moved / 'a'))
  # a moved run without its cache: an error naming the missing entry, never a retraining
  lonely = tmp_path / 'lonely'
  shutil.copytree(moved / 'a', lonely / 'a')
  shutil.rmtree(lonely / 'a' / 'cache')  # tiny_config keeps the cache inside the workdir
  with pytest.raises(FileNotFoundError, match='cached original model is missing'):
    unlearn.reevaluate(str(lonely / 'a'))
