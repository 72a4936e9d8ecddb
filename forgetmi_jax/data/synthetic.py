"""A synthetic stand-in for the MIMIC-CXR edema cohort, generated in-process from a seed.

Why: the real images and reports are credentialed data; tests, smoke runs and the tuning of the
unlearning methods need a cohort with the same *structure* (subjects, studies, images, folds,
label mix, long-tailed studies per subject) and the same *regime*: severity is visible in both
modalities but only imperfectly (moderate test F1), while every patient carries strong, stable
idiosyncrasies shared by all of their studies, so a model memorises its training patients
(training F1 near 1, a loss-based membership attack succeeds) and unseen patients stay hard.

Images are CXR-like drawings (body, two lung fields, heart and mediastinum, spine, clavicles,
ribs, diaphragm) whose lung haze, hilar vessels, interstitial lines and patchy alveolar
opacities grow with severity, under strong confounders (exposure, body habitus, scatter,
effusions, pixel noise). Patient idiosyncrasies: positioning and anatomy, devices (pacemaker,
central line, endotracheal and enteric tubes, sternotomy wires) with patient-fixed geometry, a
side marker, and a texture fingerprint. Reports are radiology-style FINDINGS / IMPRESSION text
with hedges and negations, numbers replaced by `NUMBER`, the patient's fixed phrasing choices
and patient-specific rare words.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax.data.cohort import Cohort, TEST_FOLD, read_split_csv, LABEL_COLUMN

# Studies per subject: a zero-truncated negative binomial fitted (max likelihood) to the
# paper's histogram (489/325/248/150/124/... subjects with 1/2/3/4/5/... studies, mean 3.66).
STUDIES_NB_SHAPE = 0.6971
STUDIES_NB_MEAN = 2.3507
# Images per study in the paper's cohort: 5454 / 607 / 18 / 5 studies with 1 / 2 / 3 / 4 images.
IMAGES_PER_STUDY_PMF = (5454, 607, 18, 5)
# Labels over images 2883 / 1511 / 1709 / 639 (none, vascular congestion, interstitial, alveolar).
LABEL_COUNTS = (2883, 1511, 1709, 639)


@dataclasses.dataclass
class SyntheticConfig:
  """Knobs of the generator. Negative float knobs mean "use the default" (config convention).

  Structure
    num_subjects: subjects (1663 mirrors the paper; e.g. 60 for smoke tests).
    max_studies: cap of the studies-per-subject distribution.
    test_subject_fraction: share of subjects in the TEST fold (156 / 1663).
    test_small_bias: TEST subjects are drawn with weight studies**-bias, so TEST holds fewer
      studies per subject, as in the paper (531 images for 156 subjects).
    test_image_fraction: share of images in TEST; random TEST / non-TEST subject swaps bring
      the count within 1 % of it.
    subject_severity_corr: correlation of a study's latent severity with its patient's
      tendency (within-subject label std 0.69 vs 1.02 overall in the real cohort).
  Signal strengths (the regime)
    severity_signal: scales the severity-driven image findings (haze, vessels, interstitial
      lines, alveolar patches) and the chance (0.85 * s, capped at 1) that a report states the
      edema grade at all. 0 removes the label signal from both modalities.
    patient_signal: scales every per-patient idiosyncrasy: anatomy / positioning spread,
      texture fingerprint amplitude, device and marker visibility, and the chance
      (0.9 * s, capped at 1) that a report uses the patient's own phrasing and rare words.
      0 makes patients exchangeable apart from their labels.
    label_noise: per study and per modality, the chance that the *shown* grade is one step
      away from the label (ambiguous cases, reader disagreement).
    hedge_prob: chance a stated grade is hedged ("possible", "cannot exclude", "versus").
  Nuisance
    confounder: scales exposure, habitus haze, scatter fields and effusions.
    noise_std: pixel noise standard deviation (before the divide-by-max normalisation).
    rare_vocab_size: pool of pseudo-words from which each patient gets `rare_words_per_patient`.
    lazy_images: render images on demand (None: lazily above 128 px, eagerly otherwise).

  Calibration, roughly, at the defaults (64 px, seed 0; sklearn / a quick flax CNN, not the
  project's model): a 4-stage CNN (Adam 1e-3, batch 32) reaches train / test macro-F1 0.69 / 0.42
  after 15 epochs (train still rising); an MLP on 32 px pixels 1.00 / 0.39; logistic
  regression on report n-grams 0.93 / 0.72; a 1-NN on image PCA finds another study of the
  same patient 69 % of the time (0 % at patient_signal=0).
  """
  num_subjects: int = 1663
  max_studies: int = 33
  test_subject_fraction: float = 156 / 1663
  test_small_bias: float = 0.25
  test_image_fraction: float = 531 / 6742
  subject_severity_corr: float = 0.73
  severity_signal: float = 1.0
  patient_signal: float = 1.0
  label_noise: float = 0.2
  hedge_prob: float = 0.3
  confounder: float = 1.0
  noise_std: float = 0.05
  rare_vocab_size: int = 600
  rare_words_per_patient: int = 2
  lazy_images: bool | None = None

  def resolved(self) -> 'SyntheticConfig':
    """Copy with negative float knobs replaced by their defaults."""
    defaults = SyntheticConfig()
    out = dataclasses.replace(self)
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, float) and v < 0:
        setattr(out, f.name, getattr(defaults, f.name))
    return out


# ----------------------------------------------------------------------------------- structure
def _quantile_counts(pmf: np.ndarray, n: int) -> np.ndarray:
  """Values 1..len(pmf) for n items at the mid-quantiles: the histogram follows the pmf exactly."""
  cdf = np.cumsum(pmf / pmf.sum())
  u = (np.arange(n) + 0.5) / n
  return np.minimum(np.searchsorted(cdf, u, side='right'), len(pmf) - 1) + 1


def studies_pmf(max_studies: int = 33) -> np.ndarray:
  """pmf over 1..max_studies of the studies-per-subject distribution (truncated NB)."""
  r, m = STUDIES_NB_SHAPE, STUDIES_NB_MEAN
  q = r / (r + m)
  f = np.array([math.exp(math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1)
                         + r * math.log(q) + k * math.log(1 - q))
                for k in range(1, max_studies + 1)])
  return f / f.sum()


def _structure(cfg: SyntheticConfig, rng: np.random.Generator):
  """Subject / study / image tables in split-file order, labels and folds."""
  n_sub = int(cfg.num_subjects)
  if n_sub < 10:
    raise ValueError(f'num_subjects must be >= 10, got {n_sub}')
  n_studies = rng.permutation(_quantile_counts(studies_pmf(cfg.max_studies), n_sub))
  total_studies = int(n_studies.sum())
  ips = rng.permutation(_quantile_counts(np.asarray(IMAGES_PER_STUDY_PMF, float), total_studies))
  subj_of_study = np.repeat(np.arange(n_sub), n_studies)
  # Labels: latent severity = patient tendency + study noise, cut at image-weighted quantiles.
  a = float(np.clip(cfg.subject_severity_corr, 0.0, 1.0))
  tendency = rng.standard_normal(n_sub)
  latent = a * tendency[subj_of_study] + np.sqrt(1 - a * a) * rng.standard_normal(total_studies)
  order = np.argsort(latent, kind='stable')
  cum = np.cumsum(ips[order]) / ips.sum()
  cuts = np.cumsum(LABEL_COUNTS)[:-1] / np.sum(LABEL_COUNTS)
  study_label = np.empty(total_studies, np.int32)
  study_label[order] = np.searchsorted(cuts, cum - 0.5 * ips[order] / ips.sum(), side='right')
  # TEST subjects: fewer studies on average (weighted draw without replacement, Gumbel top-k).
  n_test = max(2, int(round(cfg.test_subject_fraction * n_sub)))
  keys = -np.log(-np.log(rng.uniform(size=n_sub))) - cfg.test_small_bias * np.log(n_studies)
  is_test = np.zeros(n_sub, bool)
  is_test[np.argsort(-keys)[:n_test]] = True
  # Then random pairwise swaps (TEST <-> non-TEST subject) that bring the TEST image count to
  # test_image_fraction of all images (531 / 6742 in the paper).
  sub_images = np.bincount(subj_of_study, weights=ips, minlength=n_sub).astype(np.int64)
  target = cfg.test_image_fraction * sub_images.sum()
  tol = max(1.0, 0.01 * target)
  for _ in range(2000):
    diff = target - sub_images[is_test].sum()
    if abs(diff) <= tol:
      break
    leave = rng.choice(np.flatnonzero(is_test))
    enter = rng.choice(np.flatnonzero(~is_test))
    gain = sub_images[enter] - sub_images[leave]
    if gain * diff > 0 and abs(gain) <= abs(diff) + tol:
      is_test[leave], is_test[enter] = False, True
  folds = np.empty(n_sub, object)
  folds[is_test] = TEST_FOLD
  rest = rng.permutation(np.flatnonzero(~is_test))
  folds[rest] = [str(i % 5 + 1) for i in range(len(rest))]
  # Ids: MIMIC-like ranges, unique, sorted like the split file (by subject, then study).
  subject_ids = np.sort(10_000_000 + rng.choice(10_000_000, n_sub, replace=False))
  study_ids = 50_000_000 + rng.choice(10_000_000, total_studies, replace=False)
  study_ids = np.concatenate([np.sort(s) for s in np.split(study_ids, np.cumsum(n_studies)[:-1])])
  img_study = np.repeat(np.arange(total_studies), ips)
  return dict(subject_ids=subject_ids, study_ids=study_ids, study_subject=subj_of_study,
              study_label=study_label, image_study=img_study, folds=folds)


def _structure_from_split(path):
  df = read_split_csv(path)
  sub_codes, subject_ids = _codes(df['subject_id'].to_numpy())
  study_codes, study_ids = _codes(df['study_id'].to_numpy())
  study_subject = np.zeros(len(study_ids), np.int64)
  study_subject[study_codes] = sub_codes
  study_label = np.zeros(len(study_ids), np.int32)
  study_label[study_codes] = df[LABEL_COLUMN].to_numpy()
  folds = np.empty(len(subject_ids), object)
  folds[sub_codes] = df['fold'].to_numpy()
  return dict(subject_ids=subject_ids, study_ids=study_ids, study_subject=study_subject,
              study_label=study_label, image_study=study_codes, folds=folds,
              dicom_ids=df['dicom_id'].to_numpy().astype(str),
              image_labels=df[LABEL_COLUMN].to_numpy().astype(np.int32))


def _codes(values):
  """Dense codes in order of first appearance, and the unique values in that order."""
  uniq, first, inv = np.unique(values, return_index=True, return_inverse=True)
  rank = np.empty(len(uniq), np.int64)
  rank[np.argsort(first, kind='stable')] = np.arange(len(uniq))
  return rank[inv], uniq[np.argsort(first, kind='stable')]


def _dicom_ids(rng, n):
  words = rng.integers(0, 2**32, size=(n, 5), dtype=np.uint64)
  return np.array(['-'.join(f'{int(w):08x}' for w in row) for row in words])


# ------------------------------------------------------------------------------------- images
_N_FIELD = 6  # low-resolution random fields (fingerprint, scatter, alveolar patches) are 6x6


def _params(cfg: SyntheticConfig, st: dict, rng: np.random.Generator) -> dict:
  """Every random quantity the renderer needs, per subject, per study and per image."""
  ps, sev, conf = cfg.patient_signal, cfg.severity_signal, cfg.confounder
  n_sub, n_study, n_img = len(st['subject_ids']), len(st['study_ids']), len(st['image_study'])
  sub = st['study_subject'][st['image_study']]  # subject code of each image
  study = st['image_study']
  u = lambda lo, hi, n: rng.uniform(lo, hi, n)
  g = lambda n: rng.standard_normal(n)
  p = {}
  # Patient anatomy and positioning (spread scales with patient_signal), + small jitter.
  for name, mean, spread, jit in (('shift_x', 0.0, 0.08, 0.015), ('shift_y', 0.0, 0.07, 0.015),
                                  ('rot', 0.0, 0.10, 0.02), ('scale', 1.0, 0.08, 0.015),
                                  ('lung_rx', 0.31, 0.04, 0.005), ('lung_ry', 0.55, 0.05, 0.006),
                                  ('lung_cx', 0.38, 0.035, 0.004), ('heart_rx', 0.26, 0.035, 0.01),
                                  ('medi_w', 0.13, 0.025, 0.005), ('dia_y', 0.50, 0.05, 0.02),
                                  ('body_w', 0.90, 0.06, 0.01), ('rib_f', 19.0, 2.5, 0.3),
                                  ('rib_phase', 0.0, np.pi, 0.1)):
    p[name] = mean + spread * ps * g(n_sub)[sub] + jit * g(n_img)
  # Texture fingerprint: a patient's low-res field and grating (fixed across their studies).
  p['fp_field'] = (rng.standard_normal((n_sub, _N_FIELD, _N_FIELD)) * 0.035 * ps)[sub]
  p['fp_amp'] = (0.03 * ps * u(0.5, 1.5, n_sub))[sub]
  p['fp_freq'] = u(9.0, 22.0, n_sub)[sub]
  p['fp_angle'] = u(0, np.pi, n_sub)[sub]
  p['fp_phase'] = u(0, 2 * np.pi, n_sub)[sub]
  # Side marker: corner and size fixed per patient.
  p['mark_x'] = (rng.choice([-0.82, 0.82], n_sub) + 0.06 * g(n_sub))[sub]
  p['mark_y'] = u(-0.85, -0.55, n_sub)[sub]
  p['mark_amp'] = np.full(n_img, 0.5 * min(ps, 1.5))
  # Devices: which ones a patient has (persist in most of their studies) and their geometry.
  # A study follows its patient's devices with prob min(1, patient_signal), otherwise it
  # gets a random device set and geometry of its own (patients become exchangeable at 0).
  use_pat = (rng.uniform(size=n_study) < min(1.0, ps))[study]

  def pat(lo, hi):
    return np.where(use_pat, u(lo, hi, n_sub)[sub], u(lo, hi, n_study)[study])

  def device(prob, keep=0.9):
    has = rng.uniform(size=n_sub) < prob
    on_study = rng.uniform(size=n_study) < keep
    random_study = rng.uniform(size=n_study) < prob * keep
    return np.where(use_pat, has[sub] & on_study[study], random_study[study]).astype(np.float32)
  p['pm_on'] = device(0.15)
  p['pm_x'] = pat(0.35, 0.65) * np.where(pat(0, 1) < 0.2, -1.0, 1.0)
  p['pm_y'] = pat(-0.75, -0.5)
  p['pm_w'] = pat(0.06, 0.1)
  p['cl_on'] = device(0.3, keep=0.7)
  p['cl_x0'] = pat(-0.45, -0.15)
  p['cl_bend'] = pat(-0.25, 0.25)
  p['cl_end'] = pat(-0.1, 0.15)
  p['ett_on'] = device(0.08, keep=0.6)
  p['ett_end'] = pat(-0.45, -0.25)
  p['ngt_on'] = device(0.1, keep=0.6)
  p['ngt_bend'] = pat(-0.2, 0.2)
  p['wires_on'] = device(0.15, keep=1.0)
  p['wires_n'] = np.floor(pat(3, 7))
  # Severity shown in the image: label, one grade off with prob label_noise, continuous jitter.
  label = st['study_label'][study]
  shown = _noisy_grade(rng, st['study_label'], cfg.label_noise)[study].astype(np.float64)
  shown = np.clip(shown + 0.35 * g(n_img), 0.0, 3.2)
  amp = sev * np.exp(0.3 * g(n_img))
  p['haze'] = amp * 0.075 * shown
  p['vessels'] = amp * 0.06 * np.clip(shown, 0, 1.5)
  p['kerley'] = amp * 0.06 * np.clip(shown - 0.8, 0, 1.5)
  p['alveolar'] = amp * 0.16 * np.clip(shown - 1.8, 0, 1.4)
  p['sev_phase'] = u(0, 2 * np.pi, n_img)
  p['patch_field'] = rng.standard_normal((n_img, _N_FIELD, _N_FIELD))
  # Confounders.
  p['habitus'] = conf * (0.05 * ps * g(n_sub)[sub] + 0.03 * g(n_img))
  p['gain'] = np.exp(conf * 0.12 * g(n_img))
  p['gamma'] = np.exp(conf * 0.15 * g(n_img))
  p['scatter'] = conf * 0.05 * rng.standard_normal((n_img, _N_FIELD, _N_FIELD))
  eff_prob = _label_mix(np.array([0.1, 0.25, 0.4, 0.5]), 0.3, sev)[label]
  p['effusion'] = conf * (rng.uniform(size=n_img) < eff_prob) * u(0.05, 0.2, n_img)
  p['cardio'] = 0.03 * np.array([0.0, 0.5, 0.8, 1.0])[label] * min(sev, 1.5) + 0.02 * g(n_img)
  for k in p:
    p[k] = np.asarray(p[k], np.float32)
  return p


def _label_mix(per_label, base, severity_signal):
  """Label-correlated finding rates, fading to a label-free `base` as severity_signal -> 0."""
  mix = float(np.clip(severity_signal, 0.0, 1.0))
  return mix * np.asarray(per_label, float) + (1 - mix) * base


def _noisy_grade(rng, labels, label_noise):
  flip = rng.uniform(size=len(labels)) < label_noise
  step = rng.choice([-1, 1], len(labels))
  shown = labels + flip * step
  shown = np.where(shown < 0, 1, shown)
  return np.where(shown > 3, 2, shown)


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Linear interpolation matrix [n_out, n_in] (smooth fields at any resolution)."""
  x = np.linspace(0, n_in - 1, n_out)
  lo = np.clip(np.floor(x).astype(int), 0, n_in - 2)
  w = x - lo
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] = 1 - w
  m[np.arange(n_out), lo + 1] = w
  return m


def _sig(x):
  return 0.5 * (1.0 + jnp.tanh(0.5 * x))


_CHUNK = 128  # images rendered per jitted call (fixed shape: one compilation per size)


@functools.partial(jax.jit, static_argnames=('size',))
def _render_chunk(q, fields, idx, seed, noise_std, size):
  """The drawing itself, fused by XLA (numpy needs ~10x longer for the same arithmetic)."""
  q = {k: v[:, None, None] for k, v in q.items()}
  lin = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size * 2 - 1
  Y, X = jnp.meshgrid(lin, lin, indexing='ij')
  X, Y = X[None], Y[None]
  cos, sin = jnp.cos(q['rot']), jnp.sin(q['rot'])
  xs, ys = X - q['shift_x'], Y - q['shift_y']
  U = (cos * xs + sin * ys) / q['scale']
  V = (-sin * xs + cos * ys) / q['scale']
  up = jnp.asarray(_upsample_matrix(_N_FIELD, size))
  field = lambda f: jnp.einsum('hi,bij,wj->bhw', up, f, up)
  edge = 4.0 / size + 0.02  # soft edges about a pixel wide
  abs_u = jnp.abs(U)

  body = _sig((1 - abs_u / q['body_w'] - 0.05 * V ** 2) / edge)
  img = 0.04 + 0.40 * body
  abdomen = _sig((V - q['dia_y'] - 0.12 * U ** 2) / edge) * body
  lungs = jnp.zeros_like(U)
  for side in (-1.0, 1.0):
    e = ((U - side * q['lung_cx']) / q['lung_rx']) ** 2 + ((V + 0.02) / q['lung_ry']) ** 2
    lungs = jnp.maximum(lungs, _sig((1 - e) / (3 * edge)))
  lungs = lungs * (1 - abdomen)
  heart = _sig((1 - ((U - 0.07) / (q['heart_rx'] + q['cardio'])) ** 2
                - ((V - 0.28) / 0.24) ** 2) / (3 * edge))
  medi = _sig((q['medi_w'] - abs_u) / edge) * _sig((0.3 - V) / edge)
  spine = _sig((0.07 - abs_u) / edge) * body
  img = img - 0.28 * lungs + 0.22 * abdomen + 0.22 * jnp.maximum(heart, medi) * (1 - 0.5 * lungs)
  img = img + 0.08 * spine
  clav = jnp.exp(-((V + 0.62 - 0.22 * abs_u) / 0.03) ** 2) * _sig((abs_u - 0.08) / edge)
  clav = clav * _sig((0.62 - abs_u) / edge)
  ribs = jnp.maximum(0, jnp.sin(q['rib_f'] * (V - 0.3 * U ** 2) + q['rib_phase'])) ** 4
  img = img + 0.12 * clav + 0.06 * ribs * lungs
  # Patient texture fingerprint over the body.
  ang = q['fp_angle']
  grating = jnp.cos(q['fp_freq'] * (U * jnp.cos(ang) + V * jnp.sin(ang)) + q['fp_phase'])
  img = img + (field(fields['fp_field']) + q['fp_amp'] * grating) * body
  # Severity findings inside the lungs.
  r_hil = jnp.sqrt((abs_u - 0.16) ** 2 + (V + 0.02) ** 2)
  central = 0.45 + 0.55 * jnp.exp(-r_hil ** 2 / 0.12)
  basal = 0.7 + 0.5 * _sig((V - 0.1) / 0.15)
  img = img + q['haze'] * lungs * central * basal
  angle = jnp.arctan2(V + 0.02, abs_u - 0.16)
  streaks = (0.5 + 0.5 * jnp.cos(11 * angle + q['sev_phase'])) ** 6 * jnp.exp(-r_hil / 0.3)
  img = img + q['vessels'] * streaks * lungs * (1.2 - 0.5 * _sig(V / 0.2))
  kerley = (0.5 + 0.5 * jnp.cos(45 * V + q['sev_phase'])) ** 8 * _sig((abs_u - 0.45) / 0.06)
  reticular = (0.5 + 0.5 * jnp.cos(28 * U + q['sev_phase']) * jnp.cos(28 * V)) ** 3
  img = img + q['kerley'] * lungs * (kerley * _sig((V - 0.05) / 0.1) + 0.6 * reticular)
  patches = jnp.maximum(field(fields['patch_field']) + 0.3, 0)
  img = img + q['alveolar'] * lungs * patches * central
  # Confounders: habitus haze, effusion at the bases, scatter field.
  img = img + q['habitus'] * lungs
  img = img + q['effusion'] * lungs * _sig((V - q['dia_y'] + 0.22) / 0.05)
  img = img + field(fields['scatter']) * body
  # Devices and marker (very bright).
  dev = q['pm_on'] * _sig((q['pm_w'] - jnp.maximum(
      jnp.abs(U - q['pm_x']), 0.7 * jnp.abs(V - q['pm_y']))) / edge)
  lead_t = jnp.clip((V - q['pm_y']) / (0.3 - q['pm_y']), 0, 1)
  lead_x = q['pm_x'] + (0.05 - q['pm_x']) * lead_t
  dev = jnp.maximum(dev, q['pm_on'] * jnp.exp(-((U - lead_x) / (0.6 * edge)) ** 2)
                    * (V > q['pm_y']) * (V < 0.3))
  cl_t = jnp.clip((V + 0.95) / (q['cl_end'] + 0.95), 0, 1)
  cl_x = q['cl_x0'] + (0.1 - q['cl_x0']) * cl_t + q['cl_bend'] * jnp.sin(jnp.pi * cl_t)
  dev = jnp.maximum(dev, 0.8 * q['cl_on'] * jnp.exp(-((U - cl_x) / (0.5 * edge)) ** 2)
                    * (V < q['cl_end']))
  dev = jnp.maximum(dev, q['ett_on'] * _sig((0.025 - jnp.abs(U + 0.01)) / edge)
                    * (V < q['ett_end']))
  ng_x = 0.03 + q['ngt_bend'] * _sig((V - 0.3) / 0.1)
  dev = jnp.maximum(dev, 0.7 * q['ngt_on'] * jnp.exp(-((U - ng_x) / (0.5 * edge)) ** 2)
                    * (V < 0.8))
  wire_y = -0.3 + 0.7 * (jnp.floor((V + 0.3) * q['wires_n'] / 0.7) + 0.5) / q['wires_n']
  wires = jnp.exp(-(U ** 2 + (V - wire_y) ** 2) / (0.02 + edge) ** 2) * (V > -0.3) * (V < 0.4)
  dev = jnp.maximum(dev, q['wires_on'] * wires)
  mark = _sig((0.045 - jnp.maximum(jnp.abs(X - q['mark_x']), jnp.abs(Y - q['mark_y']))) / edge)
  img = img * (1 - dev) + 0.95 * dev
  img = img + q['mark_amp'] * mark
  # Exposure, pixel noise (keyed by image index), and REFERENCE 1's divide-by-max.
  img = q['gain'] * jnp.maximum(img, 1e-6) ** q['gamma']
  root = jax.random.key(seed)
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(root, i), (size, size)))(idx)
  img = jnp.maximum(img + noise_std * noise, 0)
  img = img / jnp.maximum(img.max(axis=(1, 2), keepdims=True), 1e-6)
  return img[..., None]


def render_images(p: dict, idx: np.ndarray, size: int, seed: int, noise_std: float) -> np.ndarray:
  """float32 [b, size, size, 1] in [0, 1] for image indices `idx` (deterministic per index).

  Rendered on the CPU backend in fixed-size chunks so results do not depend on the
  accelerator or on how a request is split into batches.
  """
  idx = np.asarray(idx, np.int64).reshape(-1)
  out = []
  cpu = jax.devices('cpu')[0]
  for s in range(0, len(idx), _CHUNK):
    part = idx[s:s + _CHUNK]
    pad = np.concatenate([part, np.repeat(part[:1], _CHUNK - len(part))])
    q = {k: v[pad] for k, v in p.items() if v.ndim == 1}
    fields = {k: v[pad] for k, v in p.items() if v.ndim == 3}
    with jax.default_device(cpu):
      img = _render_chunk(q, fields, pad.astype(np.uint32), np.uint32(seed),
                          np.float32(noise_std), size)
    out.append(np.asarray(img)[:len(part)])
  return np.concatenate(out) if out else np.zeros((0, size, size, 1), np.float32)


class SyntheticImages:
  """Lazy images: rendered on demand from the stored per-image parameters."""

  def __init__(self, params: dict, size: int, seed: int, noise_std: float):
    self._p, self._size, self._seed, self._noise = params, size, seed, noise_std
    self._n = len(next(iter(params.values())))
    self.shape = (self._n, size, size, 1)
    self.dtype = np.float32

  def __len__(self):
    return self._n

  def __getitem__(self, idx):
    arr = np.asarray(idx)
    if arr.ndim == 0:
      return self.render(arr.reshape(1))[0]
    if isinstance(idx, slice):
      arr = np.arange(self._n)[idx]
    return self.render(arr)

  def render(self, idx):
    return render_images(self._p, np.asarray(idx), self._size, self._seed, self._noise)


# -------------------------------------------------------------------------------------- text
_SYL = ('ba be bi bo bu da de di do du fa fe fi fo ka ke ki ko ku la le li lo lu ma me mi mo mu '
        'na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo '
        'za ze zi zo').split()
_CODA = ('', 'n', 'r', 'l', 'x', 'm', 's', 'th', 'rk', 'nd')

HEART = ('heart size is normal', 'the cardiac silhouette is within normal limits',
         'heart size is top normal', 'the heart is normal in size',
         'cardiac silhouette size is unchanged', 'cardiomediastinal silhouette is stable')
HEART_BIG = ('the heart is mildly enlarged', 'moderate cardiomegaly is again seen',
             'the cardiac silhouette is enlarged', 'cardiomegaly is unchanged')
MEDIASTINUM = ('mediastinal and hilar contours are unremarkable', 'the mediastinal contours are normal',
               'hilar contours are stable', 'the aorta is tortuous',
               'mediastinal contours are within normal limits')
PLEURA = ('there is no pneumothorax', 'no pneumothorax is seen', 'no pleural effusion or pneumothorax',
          'there is no evidence of pneumothorax', 'no focal consolidation or pneumothorax')
EFFUSION = ('small bilateral pleural effusions', 'a small right pleural effusion is present',
            'small left pleural effusion', 'trace bilateral pleural effusions',
            'moderate right pleural effusion with adjacent atelectasis')
ATELECTASIS = ('bibasilar atelectasis', 'streaky left basilar opacity likely atelectasis',
               'mild bibasilar atelectasis', 'linear atelectasis at the right base',
               'retrocardiac opacity may reflect atelectasis')
COMPARISON = ('comparison is made to the prior study from NUMBER',
              'compared to the previous radiograph of NUMBER',
              'as compared to the prior chest radiograph',
              'single portable view of the chest', 'ap upright view of the chest',
              'pa and lateral views of the chest were obtained')
CLOSING = ('no acute cardiopulmonary process otherwise', 'no other significant interval change',
           'osseous structures are unremarkable', 'the visualized osseous structures are intact',
           'degenerative changes of the thoracic spine', 'no acute osseous abnormality')
GRADE = {
    0: ('no pulmonary edema', 'no evidence of pulmonary edema', 'the lungs are clear',
        'no vascular congestion or edema', 'lungs are well expanded and clear',
        'no signs of pulmonary vascular congestion'),
    1: ('mild pulmonary vascular congestion', 'pulmonary vascular engorgement',
        'cephalization of the pulmonary vasculature', 'mild vascular congestion without frank edema',
        'prominence of the pulmonary vascular markings', 'mild interstitial markings prominence'),
    2: ('mild interstitial pulmonary edema', 'interstitial edema', 'kerley b lines and peribronchial cuffing',
        'mild to moderate pulmonary edema', 'increased interstitial markings consistent with edema',
        'interstitial edema has slightly increased'),
    3: ('moderate to severe pulmonary edema', 'alveolar edema', 'diffuse bilateral airspace opacities',
        'severe pulmonary edema', 'extensive perihilar alveolar opacities consistent with edema',
        'worsening alveolar pulmonary edema'),
}
GRADE_IMPRESSION = {
    0: ('no acute cardiopulmonary process', 'no evidence of chf', 'no edema',
        'clear lungs without edema'),
    1: ('mild vascular congestion', 'mild chf without edema', 'vascular congestion',
        'mild fluid overload'),
    2: ('mild pulmonary edema', 'interstitial edema', 'mild chf', 'mild to moderate chf'),
    3: ('severe pulmonary edema', 'moderate to severe chf', 'alveolar edema',
        'worsening pulmonary edema'),
}
VAGUE = ('lung volumes are low', 'no significant interval change in the appearance of the lungs',
         'lungs are grossly unchanged', 'limited evaluation of the lung bases',
         'low lung volumes limit assessment of the vasculature', 'no new focal opacity')
HEDGES = ('possible', 'cannot exclude', 'likely', 'probable', 'questionable', 'findings may represent')
DEVICES = {
    'pm_on': ('left chest wall pacemaker with leads in the right atrium and right ventricle',
              'dual lead pacer device is unchanged', 'cardiac pacemaker in stable position'),
    'cl_on': ('right internal jugular central venous catheter terminates in the cavoatrial junction',
              'central line tip in the low svc', 'left picc line terminates in the mid svc'),
    'ett_on': ('endotracheal tube terminates NUMBER cm above the carina',
               'et tube in standard position', 'endotracheal tube tip NUMBER cm from the carina'),
    'ngt_on': ('enteric tube courses below the diaphragm', 'nasogastric tube tip in the stomach',
               'feeding tube passes below the diaphragm out of view'),
    'wires_on': ('median sternotomy wires are intact', 'sternal wires and mediastinal clips',
                 'post cabg changes with intact sternal wires'),
}
RARE_TEMPLATES = ('stable {w} clips in the left upper quadrant', 'known {w} nodule in the right apex',
                  'post {w} repair changes', 'chronic {w} deformity of the posterior ribs',
                  'residual {w} catheter fragment', 'calcified {w} granuloma again seen',
                  '{w} stent in the upper abdomen', 'old {w} fracture of the clavicle')


def rare_vocabulary(n: int, seed: int) -> list[str]:
  """n distinct pseudo-words (patient-specific rare tokens), deterministic from seed."""
  r = random.Random(f'rare-{seed}')
  words = set()
  while len(words) < n:
    words.add(''.join(r.choice(_SYL) for _ in range(r.choice((2, 3)))) + r.choice(_CODA))
  return sorted(words)


def make_reports(cfg: SyntheticConfig, st: dict, params: dict, seed: int) -> list[str]:
  """One report per study (FINDINGS / IMPRESSION, lower case, numbers as `NUMBER`)."""
  r = random.Random(f'reports-{seed}')
  n_sub = len(st['subject_ids'])
  rare = rare_vocabulary(cfg.rare_vocab_size, seed)
  pick = lambda seq: seq[r.randrange(len(seq))]
  styles = [dict(heart=r.randrange(len(HEART)), big=r.randrange(len(HEART_BIG)),
                 medi=r.randrange(len(MEDIASTINUM)), pleura=r.randrange(len(PLEURA)),
                 comp=r.randrange(len(COMPARISON)), close=r.randrange(len(CLOSING)),
                 dev={k: r.randrange(3) for k in DEVICES}, order=r.random() < 0.5,
                 rare=[(pick(RARE_TEMPLATES), pick(rare)) for _ in range(cfg.rare_words_per_patient)])
            for _ in range(n_sub)]
  random_style = lambda: dict(heart=r.randrange(len(HEART)), big=r.randrange(len(HEART_BIG)),
                              medi=r.randrange(len(MEDIASTINUM)), pleura=r.randrange(len(PLEURA)),
                              comp=r.randrange(len(COMPARISON)), close=r.randrange(len(CLOSING)),
                              dev={k: r.randrange(3) for k in DEVICES}, order=r.random() < 0.5,
                              rare=[])
  p_style = min(1.0, 0.9 * cfg.patient_signal)
  p_grade = min(1.0, 0.85 * cfg.severity_signal)
  p_big = _label_mix([0.05, 0.1, 0.6, 0.6], 0.3, cfg.severity_signal)
  p_eff = _label_mix([0.1, 0.25, 0.4, 0.5], 0.3, cfg.severity_signal)
  labels = st['study_label']
  shown = _noisy_grade(np.random.default_rng([seed, 11]), labels, cfg.label_noise)
  first_img = np.full(len(labels), -1)
  first_img[st['image_study'][::-1]] = np.arange(len(st['image_study']))[::-1]
  reports = []
  for s in range(len(labels)):
    own = r.random() < p_style
    sty = styles[st['study_subject'][s]] if own else random_style()
    g = int(shown[s])
    i = first_img[s]
    findings = [COMPARISON[sty['comp']]] if r.random() < 0.6 else []
    for k in DEVICES:
      if i >= 0 and params[k][i] > 0:
        findings.append(DEVICES[k][sty['dev'][k]])
    if r.random() < p_grade:
      grade = pick(GRADE[g])
      if r.random() < cfg.hedge_prob:
        if g < 3 and r.random() < 0.5:
          grade = f'{grade} versus {pick(GRADE[g + 1])}'
        else:
          grade = f'{pick(HEDGES)} {grade}'
      findings.append(grade)
    else:
      findings.append(pick(VAGUE))
    heart = HEART_BIG[sty['big']] if r.random() < p_big[labels[s]] else HEART[sty['heart']]
    body = [heart, MEDIASTINUM[sty['medi']]]
    findings += body[::-1] if sty['order'] else body
    if r.random() < p_eff[labels[s]]:
      findings.append(pick(EFFUSION))
    else:
      findings.append(PLEURA[sty['pleura']])
    if r.random() < 0.25:
      findings.append(pick(ATELECTASIS))
    if own:
      findings += [t.format(w=w) for t, w in sty['rare']]
    if r.random() < 0.5:
      findings.append(CLOSING[sty['close']])
    if r.random() < p_grade:
      imp = pick(GRADE_IMPRESSION[g])
      if r.random() < cfg.hedge_prob:
        imp = f'{pick(HEDGES)} {imp}'
    else:
      imp = pick(('no significant interval change', 'stable appearance of the chest',
                  'limited study', 'see findings above'))
    if r.random() < 0.2:
      imp += ' , NUMBER'
    reports.append('findings : ' + ' . '.join(findings) + ' . impression : ' + imp + ' .')
  return reports


# ------------------------------------------------------------------------------------ entry
def make_synthetic_cohort(seed: int = 0, image_size: int = 64, split_csv=None,
                          config: SyntheticConfig | None = None, **knobs: Any) -> Cohort:
  """A deterministic synthetic cohort (see the module docstring and `SyntheticConfig`).

  With `split_csv` the cohort has exactly that file's subjects, studies, images, labels and
  folds (`num_subjects` is then ignored); pixels and text are synthetic.
  """
  cfg = dataclasses.replace(config) if config is not None else SyntheticConfig()
  names = {f.name for f in dataclasses.fields(SyntheticConfig)}
  unknown = sorted(set(knobs) - names)
  if unknown:
    raise TypeError(f'unknown synthetic knob(s) {unknown}; known: {sorted(names)}')
  cfg = dataclasses.replace(cfg, **knobs).resolved()
  if image_size < 16:
    raise ValueError(f'image_size must be >= 16, got {image_size}')
  rng = np.random.default_rng([seed, 1])
  if split_csv:
    st = _structure_from_split(split_csv)
  else:
    st = _structure(cfg, rng)
  params = _params(cfg, st, np.random.default_rng([seed, 2]))
  reports = make_reports(cfg, st, params, seed)
  img_study = st['image_study']
  sub = st['study_subject'][img_study]
  lazy = cfg.lazy_images if cfg.lazy_images is not None else image_size > 128
  images = SyntheticImages(params, image_size, seed, cfg.noise_std)
  if not lazy:
    images = images.render(np.arange(len(img_study)))
  dicom = st.get('dicom_ids')
  if dicom is None:
    dicom = _dicom_ids(np.random.default_rng([seed, 3]), len(img_study))
  labels = st.get('image_labels')
  if labels is None:
    labels = st['study_label'][img_study]
  return Cohort(images=images, reports=[reports[s] for s in img_study], labels=labels,
                subject_id=st['subject_ids'][sub], study_id=st['study_ids'][img_study],
                dicom_id=dicom, fold=st['folds'][sub].astype(str))
