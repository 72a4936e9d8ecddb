"""The synthetic cohort: structure mirrors the paper's, determinism, and the knobs' effects."""
import re
from pathlib import Path

import numpy as np
import pytest

from forgetmi_jax.data.cohort import read_split_csv
from forgetmi_jax.data.synthetic import SyntheticConfig, make_synthetic_cohort

SPLIT = (Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'mimic_cxr_edema'
         / 'mimic-cxr-sub-img-edema-split-manualtest.csv')


@pytest.fixture(scope='module')
def full():
  # Structure only: lazy images are not rendered unless asked for.
  return make_synthetic_cohort(seed=0, lazy_images=True)


@pytest.fixture(scope='module')
def small():
  return make_synthetic_cohort(seed=0, image_size=32, num_subjects=150)


def test_default_structure_mirrors_the_paper(full):
  df = full.to_frame()
  assert df['subject_id'].nunique() == 1663
  assert abs(len(df) - 6742) <= 0.01 * 6742
  assert abs(df['study_id'].nunique() - 6084) <= 0.01 * 6084
  mix = np.bincount(full.labels, minlength=4) / len(full)
  np.testing.assert_allclose(mix, np.array([2883, 1511, 1709, 639]) / 6742, atol=0.01)
  sps = df.groupby('subject_id')['study_id'].nunique()
  hist = sps.value_counts()
  for k, real in ((1, 489), (2, 325), (3, 248), (4, 150), (5, 124)):
    assert abs(hist.get(k, 0) - real) <= 0.12 * real + 5, (k, hist.get(k, 0), real)
  assert 3.4 < sps.mean() < 3.9 and sps.max() >= 20
  test = df[df['fold'] == 'TEST']
  assert test['subject_id'].nunique() == 156
  assert abs(len(test) - 531) <= 0.02 * 531
  # Folds are by subject, 1..5 balanced in subjects.
  assert df.groupby('subject_id')['fold'].nunique().max() == 1
  per_fold = df[df['fold'] != 'TEST'].groupby('fold')['subject_id'].nunique()
  assert sorted(per_fold.index) == ['1', '2', '3', '4', '5'] and per_fold.max() - per_fold.min() <= 1
  # Images of a study share label and report; ids unique and sorted like the split file.
  assert df.groupby('study_id')['edeme_severity'].nunique().max() == 1
  rep = {}
  for st, r in zip(full.study_id, full.reports):
    assert rep.setdefault(st, r) == r
  assert df['dicom_id'].is_unique
  assert (np.diff(full.subject_id) >= 0).all()


def test_reports_look_like_normalised_radiology_text(full):
  texts = set(full.reports)
  joined = ' '.join(texts)
  assert not re.search(r'\d', joined)  # numbers became NUMBER
  assert 'NUMBER' in joined
  assert 'findings :' in joined and 'impression :' in joined
  for phrase in ('no pulmonary edema', 'cannot exclude', 'possible', 'vascular congestion',
                 'alveolar edema', 'pneumothorax'):
    assert phrase in joined, phrase
  vocab = {w for t in texts for w in t.split()}
  assert 200 <= len(vocab) <= 2500


def test_patient_specific_rare_words(full):
  # Words used by only a few patients: most multi-study patients reuse theirs across studies.
  word_subjects = {}
  pairs = set(zip(full.subject_id.tolist(), full.reports))
  for sub, t in pairs:
    for w in set(t.split()):
      word_subjects.setdefault(w, set()).add(sub)
  rare = {w for w, s in word_subjects.items() if len(s) <= 12}
  assert len(rare) >= 200
  by_subject = {}
  for sub, t in pairs:
    by_subject.setdefault(sub, []).append(rare & set(t.split()))
  shared = [bool(set.intersection(*own)) for own in by_subject.values() if len(own) >= 3]
  assert len(shared) > 100 and np.mean(shared) > 0.5


def test_deterministic_and_seed_dependent():
  a = make_synthetic_cohort(seed=3, image_size=32, num_subjects=40)
  b = make_synthetic_cohort(seed=3, image_size=32, num_subjects=40)
  c = make_synthetic_cohort(seed=4, image_size=32, num_subjects=40)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.reports == b.reports and (a.labels == b.labels).all()
  np.testing.assert_array_equal(a.dicom_id, b.dicom_id)
  assert len(a) != len(c) or not np.array_equal(a.images, c.images)
  assert a.reports != c.reports


def test_images_shape_range_and_lazy_equals_eager(small):
  x = small.images
  assert x.shape == (len(small), 32, 32, 1) and x.dtype == np.float32
  assert x.min() >= 0 and x.max() <= 1 and np.allclose(x.max(axis=(1, 2, 3)), 1.0)
  lazy = make_synthetic_cohort(seed=0, image_size=32, num_subjects=150, lazy_images=True)
  idx = np.array([5, 0, 77, 5, len(small) - 1])
  np.testing.assert_allclose(lazy.get_images(idx), x[idx], atol=1e-6)
  assert lazy.image_size == 32


def _lung_intensity(c):
  x = c.get_images(np.arange(len(c)))[..., 0]
  s = x.shape[1]
  a, b = s // 4, 3 * s // 4
  left = x[:, a:b, s // 6:s // 3]
  right = x[:, a:b, 2 * s // 3:5 * s // 6]
  return np.concatenate([left.reshape(len(c), -1), right.reshape(len(c), -1)], 1).mean(1)


def _spearman(a, b):
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b + 1e-9 * np.arange(len(b))))
  return np.corrcoef(ra, rb)[0, 1]


def _same_patient_distance_ratio(c):
  x = c.get_images(np.arange(len(c))).reshape(len(c), -1)
  x = x - x.mean(1, keepdims=True)
  sq = (x ** 2).sum(1)
  d = sq[:, None] + sq[None] - 2 * x @ x.T
  same = (c.subject_id[:, None] == c.subject_id[None]) & (c.study_id[:, None] != c.study_id[None])
  diff = c.subject_id[:, None] != c.subject_id[None]
  return d[same].mean() / d[diff].mean()


def test_severity_signal_knob(small):
  r = _spearman(_lung_intensity(small), small.labels)
  none = make_synthetic_cohort(seed=0, image_size=32, num_subjects=150, severity_signal=0.0)
  r0 = _spearman(_lung_intensity(none), none.labels)
  assert r > 0.3 and abs(r0) < 0.2, (r, r0)


def test_patient_signal_knob(small):
  strong = _same_patient_distance_ratio(small)
  none = make_synthetic_cohort(seed=0, image_size=32, num_subjects=150, patient_signal=0.0)
  assert strong < 0.6 and _same_patient_distance_ratio(none) > 0.85


def test_label_noise_knob():
  clean = make_synthetic_cohort(seed=0, image_size=16, num_subjects=100, label_noise=0.0,
                                hedge_prob=0.0, severity_signal=2.0, lazy_images=True)
  phrase = {0: 'no evidence of chf', 3: 'severe pulmonary edema'}
  # Without label noise an impression phrase only appears with its own grade.
  for lab, p in phrase.items():
    hits = [l for l, t in zip(clean.labels, clean.reports) if f'impression : {p}' in t]
    assert hits and set(hits) == {lab}


def test_knob_validation_and_defaults():
  with pytest.raises(TypeError, match='unknown synthetic knob'):
    make_synthetic_cohort(num_subjects=20, colour=3)
  cfg = SyntheticConfig(severity_signal=-1.0).resolved()
  assert cfg.severity_signal == SyntheticConfig().severity_signal


def test_tiny_cohort_for_smoke_runs():
  c = make_synthetic_cohort(seed=1, image_size=32, num_subjects=60)
  df = c.to_frame()
  assert df['subject_id'].nunique() == 60 and (df['fold'] == 'TEST').any()
  assert set(df['fold']) - {'TEST'} == {'1', '2', '3', '4', '5'}


@pytest.mark.skipif(not SPLIT.exists(), reason=f'shared split file absent: {SPLIT}')
def test_mirror_a_split_file():
  c = make_synthetic_cohort(seed=0, split_csv=SPLIT, lazy_images=True)
  df = read_split_csv(SPLIT)
  np.testing.assert_array_equal(c.subject_id, df['subject_id'])
  np.testing.assert_array_equal(c.study_id, df['study_id'])
  np.testing.assert_array_equal(c.dicom_id, df['dicom_id'].astype(str))
  np.testing.assert_array_equal(c.labels, df['edeme_severity'])
  np.testing.assert_array_equal(c.fold, df['fold'].astype(str))
  assert c.get_images([0, 6741]).shape == (2, 64, 64, 1)
