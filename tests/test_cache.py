"""The model cache: entries are built under an exclusive lock, and a purge removes exactly the
cached models that saw a forgotten patient (plus report-derived vocabularies and tokens)."""
import json
import os
import threading
import time

from forgetmi_jax.runs import purge
from forgetmi_jax.train import cache


def test_lock_makes_a_second_writer_wait(tmp_path):
  entry = str(tmp_path / 'original-abc')
  order = []

  def first():
    with cache.lock(entry):
      order.append('first in')
      time.sleep(0.5)
      cache.mark_complete(entry, {'seconds': 1.0})
      order.append('first out')

  def second():
    time.sleep(0.1)
    with cache.lock(entry):
      order.append('second in, complete=%s' % cache.is_complete(entry))
  threads = [threading.Thread(target=first), threading.Thread(target=second)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert order == ['first in', 'first out', 'second in, complete=True']


def _entry(root, name, subjects=None):
  path = root / name
  (path / 'variables').mkdir(parents=True)
  meta = {'seconds': 1.0} if subjects is None else {'seconds': 1.0, 'subjects': subjects}
  (path / 'COMPLETE').write_text(json.dumps(meta))
  return path


def test_purge_removes_the_models_that_saw_the_patients(tmp_path):
  saw = _entry(tmp_path, 'original-aaa', [1, 2, 3])
  clean = _entry(tmp_path, 'retrain-bbb', [1, 3])
  unknown = _entry(tmp_path, 'retrain-ccc')  # no list of patients: provenance unknown
  (tmp_path / 'tokenizer-x-600').mkdir()
  (tmp_path / 'tokens-1-80-ab.npz').write_bytes(b'0')
  dry = purge.purge_cache(str(tmp_path), [2], dry_run=True)
  assert (dry.models_removed, dry.models_kept) == (2, 1) and saw.exists()
  done = purge.purge_cache(str(tmp_path), [2])
  assert (done.models_removed, done.models_kept, done.tokenizers_removed,
          done.token_caches_removed) == (2, 1, 1, 1)
  assert not saw.exists() and not unknown.exists() and clean.exists()
  assert not (tmp_path / 'tokenizer-x-600').exists()


def test_read_subjects_names_the_file(tmp_path):
  good = tmp_path / 'r.csv'
  good.write_text('subject_id,note\n12,a\n12.0,b\n7,c\n')
  assert purge.read_subjects(str(good)) == [7, 12]
  bad = tmp_path / 'bad.csv'
  bad.write_text('patient\n1\n')
  try:
    purge.read_subjects(str(bad))
  except ValueError as e:
    assert str(bad) in str(e)
  else:
    raise AssertionError('no error')
  assert os.path.exists(good)
