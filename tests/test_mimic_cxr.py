"""The MIMIC-CXR loader on a tiny fabricated tree in the MIMIC layout (written here)."""
import concurrent.futures
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from forgetmi_jax.data import mimic_cxr as M

SECRET = 'zanzibarword'  # appears in a report: must never show up in errors
SIZE = 32


def _dicom(path, pixels, photometric='MONOCHROME2', truncate=False):
  import pydicom
  from pydicom.dataset import FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1'
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  data = pixels.astype(np.uint16).tobytes()
  ds.PixelData = data[:len(data) // 3] if truncate else data
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def _image(path, pixels, mode):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels.astype(np.uint16 if mode == 'I;16' else np.uint8)).save(path)


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___ year old woman with {secret} dyspnea

 COMPARISON:  Chest radiograph from ___ at 10:30

 FINDINGS:

 There is mild pulmonary vascular congestion. Heart size is enlarged, 12 cm.
 ET tube terminates 4.5 cm above the carina.

 IMPRESSION:

 1. Mild pulmonary edema.
 2. No pneumothorax.
"""

ROWS = [  # subject, study, dicom, label, fold, kind
    (10000032, 50414267, 'd0', 0, '1', 'dcm_halves'),
    (10000032, 50414267, 'd1', 0, '1', 'dcm_pad_mono1'),
    (10000032, 53189527, 'd2', 2, '1', 'jpg'),
    (11000011, 51111111, 'd3', 3, 'TEST', 'png16'),
    (12000022, 52222222, 'd4', 1, '2', 'dcm_halves'),
]


def _tree(root, truncate_dicom=None):
  """Fabricate files/ in the MIMIC layout; returns the split CSV path."""
  for sub, st, dic, lab, fold, kind in ROWS:
    d = M.study_dir(root, sub, st)
    if kind == 'dcm_halves':  # 1900 x 2200: cropped in width, padded in height
      px = np.full((1900, 2200), 1000, np.uint16)
      px[:, 1100:] = 500
      _dicom(os.path.join(d, dic + '.dcm'), px, truncate=(dic == truncate_dicom))
    elif kind == 'dcm_pad_mono1':  # 1024 square of 0 in MONOCHROME1 -> inverted to max
      px = np.zeros((1024, 1024), np.uint16)
      px[0, 0] = 4000  # after inversion: 4000 everywhere but this pixel
      _dicom(os.path.join(d, dic + '.dcm'), px, photometric='MONOCHROME1')
    elif kind == 'jpg':
      px = np.full((2048, 2048), 200, np.uint8)
      px[:1024] = 100
      _image(os.path.join(d, dic + '.jpg'), px, 'L')
    elif kind == 'png16':
      px = np.full((2048, 2048), 30000, np.uint16)
      px[:, :1024] = 60000
      _image(os.path.join(d, dic + '.png'), px, 'I;16')
    with open(M.report_path(root, sub, st), 'w') as f:
      f.write(REPORT.format(secret=SECRET))
  csv = os.path.join(root, 'split.csv')
  pd.DataFrame([r[:5] for r in ROWS], columns=['subject_id', 'study_id', 'dicom_id',
                                               'edeme_severity', 'fold']).to_csv(csv, index=False)
  return csv


def _leftovers(data_dir):
  if not os.path.exists(data_dir):
    return []
  return [os.path.join(dp, f) for dp, dn, fn in os.walk(data_dir) for f in fn + dn]


def test_report_extraction():
  text = M.extract_sections(REPORT.format(secret=SECRET))
  assert text.startswith('findings : there is mild pulmonary vascular congestion')
  assert 'impression : NUMBER . mild pulmonary edema' in text
  assert 'NUMBER cm' in text and '4.5' not in text and '12' not in text
  assert SECRET not in text and 'indication' not in text and 'comparison' not in text
  assert M.extract_sections('no headers here') == ''


def test_round_trip(tmp_path):
  root = str(tmp_path / 'mimic')
  csv = _tree(root)
  data_dir = str(tmp_path / 'tfds')
  cohort = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  assert len(cohort) == len(ROWS)
  np.testing.assert_array_equal(cohort.subject_id, [r[0] for r in ROWS])
  np.testing.assert_array_equal(cohort.study_id, [r[1] for r in ROWS])
  np.testing.assert_array_equal(cohort.dicom_id, [r[2] for r in ROWS])
  np.testing.assert_array_equal(cohort.labels, [r[3] for r in ROWS])
  np.testing.assert_array_equal(cohort.fold, [r[4] for r in ROWS])
  assert cohort.image_size == SIZE
  assert cohort.reports[0] == cohort.reports[1]  # one report per study
  assert 'mild pulmonary vascular congestion' in cohort.reports[0]
  imgs = cohort.get_images(np.arange(len(ROWS)))
  assert imgs.shape == (5, SIZE, SIZE, 1) and imgs.dtype == np.float32
  assert imgs.min() >= 0 and imgs.max() <= 1
  # DICOM 1900x2200: /max -> 1 | 0.5, width cropped (halves kept), height padded by 74 rows.
  x = imgs[0, ..., 0]
  np.testing.assert_allclose(x[4:28, 2:15], 1.0, atol=1e-4)
  np.testing.assert_allclose(x[4:28, 17:30], 0.5, atol=1e-4)
  assert x[0].max() < 0.5 and x[-1].max() < 0.5  # zero padding (partly covered top/bottom)
  # MONOCHROME1 1024 square: inverted, /max, zero-padded into the central 16x16 block.
  y = imgs[1, ..., 0]
  np.testing.assert_allclose(y[9:23, 9:23], 1.0, atol=1e-3)
  assert y[:8].max() == 0 and y[:, 24:].max() == 0
  # JPG: top half 100/200 = 0.5, bottom 1.0 (lossy: tolerance).
  z = imgs[2, ..., 0]
  np.testing.assert_allclose(z[2:14].mean(), 0.5, atol=0.02)
  np.testing.assert_allclose(z[18:30].mean(), 1.0, atol=0.02)
  # 16-bit PNG: left 1.0, right 0.5.
  w = imgs[3, ..., 0]
  np.testing.assert_allclose(w[:, :16], 1.0, atol=1e-4)
  np.testing.assert_allclose(w[:, 16:], 0.5, atol=1e-4)
  # Reading any order / repeated indices (padded batches) gives the same rows.
  np.testing.assert_array_equal(cohort.get_images([3, 0, 3]), imgs[[3, 0, 3]])
  # Built once: the data source is array_record under data_dir, and a second load reuses it.
  folder = M.build_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  files = os.listdir(folder)
  assert any('array_record' in f for f in files) and M.META_FILE in files
  stamp = os.path.getmtime(os.path.join(folder, M.META_FILE))
  again = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  assert os.path.getmtime(os.path.join(folder, M.META_FILE)) == stamp
  np.testing.assert_array_equal(again.get_images([4]), imgs[[4]])
  assert not [p for p in os.listdir(data_dir) if p.startswith('.incomplete')]


def test_reports_tsv(tmp_path):
  root = str(tmp_path / 'mimic')
  csv = _tree(root)
  tsv = str(tmp_path / 'reports.tsv')
  studies = sorted({(r[1], r[3]) for r in ROWS})
  with open(tsv, 'w') as f:
    for i, (st, lab) in enumerate(studies):
      f.write(f'{i}\t{lab}\t{st}\ta\tmild edema seen on study {i + 3}\n')
  cohort = M.load_mimic_cxr(csv, root, str(tmp_path / 'tfds'), image_size=SIZE, reports_tsv=tsv)
  by_study = dict(zip(cohort.study_id.tolist(), cohort.reports))
  for i, (st, _) in enumerate(studies):
    assert by_study[st] == 'mild edema seen on study NUMBER'


def test_missing_files_one_error_nothing_left(tmp_path):
  root = str(tmp_path / 'mimic')
  csv = _tree(root)
  os.remove(os.path.join(M.study_dir(root, 12000022, 52222222), 'd4.dcm'))
  os.remove(M.report_path(root, 11000011, 51111111))
  with open(os.path.join(M.study_dir(root, 10000032, 53189527), 'd2.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(M.MimicDataError) as err:
    M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  msg = str(err.value)
  assert '3 problem(s)' in msg
  assert 'missing image' in msg and 'missing report' in msg and 'corrupt image' in msg
  assert 'd4.dcm' in msg or 'd4.{dcm' in msg
  assert 's51111111.txt' in msg and 'd2.jpg' in msg
  assert SECRET not in msg and 'congestion' not in msg
  assert _leftovers(data_dir) == []


def test_decode_failure_discards_the_build(tmp_path):
  root = str(tmp_path / 'mimic')
  csv = _tree(root, truncate_dicom='d4')  # header fine, pixel data truncated
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(M.MimicDataError) as err:
    M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  assert '1 problem(s)' in str(err.value) and 'd4.dcm' in str(err.value)
  assert SECRET not in str(err.value)
  assert _leftovers(data_dir) == []


def test_bad_split_file_names_row_and_column(tmp_path):
  csv = tmp_path / 'split.csv'
  csv.write_text('subject_id,study_id,dicom_id,edeme_severity,fold\n1,2,a,0,1\n1,3,b,7,1\n')
  with pytest.raises(ValueError, match=r'split.csv, data row 2, column .edeme_severity.'):
    M.load_mimic_cxr(str(csv), str(tmp_path), str(tmp_path / 'tfds'))


# ------------------------------------------------------------- cache key, image fit, leftovers
def _records(caplog, word):
  return [r for r in caplog.records if r.name == 'forgetmi_jax' and word in r.getMessage()]


def _build_dir(final):
  return os.path.basename(os.path.dirname(final))


def test_cache_keyed_by_image_and_report_files(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='forgetmi_jax')
  root_a, data_dir = str(tmp_path / 'a'), str(tmp_path / 'tfds')
  csv = _tree(root_a)
  a = M.load_mimic_cxr(csv, root_a, data_dir, image_size=SIZE)
  assert len(_records(caplog, 'building')) == 1 and not _records(caplog, 'reusing')
  name_a = a.images.build_key
  # Tree B: a copy with one image and one report edited.
  root_b = str(tmp_path / 'b')
  shutil.copytree(root_a, root_b)
  _image(os.path.join(M.study_dir(root_b, 10000032, 53189527), 'd2.jpg'),
         np.full((2048, 2048), 200, np.uint8), 'L')  # was half 100, half 200
  with open(M.report_path(root_b, 11000011, 51111111), 'w') as f:
    f.write(REPORT.format(secret=SECRET).replace('Mild pulmonary edema', 'Severe alveolar edema'))
  caplog.clear()
  b = M.load_mimic_cxr(csv, root_b, data_dir, image_size=SIZE)
  assert len(_records(caplog, 'building')) == 1 and b.images.build_key != name_a
  img_a, img_b = a.get_images(np.arange(5)), b.get_images(np.arange(5))
  np.testing.assert_allclose(img_a[2, 2:14].mean(), 0.5, atol=0.02)  # A's pixels ...
  np.testing.assert_allclose(img_b[2, 2:30].mean(), 1.0, atol=0.02)  # ... B's new ones
  np.testing.assert_array_equal(img_a[[0, 1, 3, 4]], img_b[[0, 1, 3, 4]])
  assert 'mild pulmonary edema' in a.reports[3] and 'severe alveolar edema' in b.reports[3]
  assert a.reports[:3] == b.reports[:3] and a.reports[4] == b.reports[4]
  # Tree A again: reused, nothing rewritten.
  final_a = M.build_mimic_cxr(csv, root_a, data_dir, image_size=SIZE)
  stamp = os.path.getmtime(os.path.join(final_a, M.META_FILE))
  caplog.clear()
  again = M.load_mimic_cxr(csv, root_a, data_dir, image_size=SIZE)
  reuse = _records(caplog, 'reusing')
  assert len(reuse) == 1 and reuse[0].levelno == logging.INFO and name_a in reuse[0].getMessage()
  assert not _records(caplog, 'building') and again.images.build_key == name_a
  assert os.path.getmtime(os.path.join(final_a, M.META_FILE)) == stamp
  np.testing.assert_array_equal(again.get_images(np.arange(5)), img_a)
  assert SECRET not in caplog.text and 'congestion' not in caplog.text
  # A report edited in place (same size, old mtime put back): its content is in the key.
  rp = M.report_path(root_a, 10000032, 50414267)
  st = os.stat(rp)
  with open(rp, 'r+') as f:
    text = f.read()
    f.seek(0)
    f.write(text.replace('mild pulmonary vascular', 'mild pulmonary arterial'))
  os.utime(rp, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.path.getsize(rp) == st.st_size
  edited = M.load_mimic_cxr(csv, root_a, data_dir, image_size=SIZE)
  assert edited.images.build_key not in (name_a, b.images.build_key)
  assert 'mild pulmonary arterial congestion' in edited.reports[0]


def test_content_hash_sees_same_size_same_mtime_image_edits(tmp_path):
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _tree(root)
  before = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE, content_hash=True)
  stat_key = M.config_name(csv, SIZE, mimic_root=root)
  path = os.path.join(M.study_dir(root, 12000022, 52222222), 'd4.dcm')
  st = os.stat(path)
  import pydicom
  ds = pydicom.dcmread(path)
  px = ds.pixel_array.copy()
  px[:, :1100] = 250  # left half 1000 -> 250 (right half stays 500, now the max)
  ds.PixelData = px.astype(np.uint16).tobytes()
  ds.save_as(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.path.getsize(path) == st.st_size
  assert M.config_name(csv, SIZE, mimic_root=root) == stat_key  # the stat key cannot see it
  after = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE, content_hash=True)
  assert after.images.build_key != before.images.build_key
  x = after.get_images([4])[0, ..., 0]
  np.testing.assert_allclose(x[4:28, 2:15], 0.5, atol=1e-4)
  np.testing.assert_allclose(x[4:28, 17:30], 1.0, atol=1e-4)


def _one_image_tree(root, width, height):
  sub, st, dic = 10000032, 50414267, 'd0'
  px = np.full((height, width), 200, np.uint8)
  _image(os.path.join(M.study_dir(root, sub, st), dic + '.jpg'), px, 'L')
  with open(M.report_path(root, sub, st), 'w') as f:
    f.write(REPORT.format(secret=SECRET))
  csv = os.path.join(root, 'split.csv')
  pd.DataFrame([(sub, st, dic, 1, '1')], columns=['subject_id', 'study_id', 'dicom_id',
                                                  'edeme_severity', 'fold']).to_csv(csv,
                                                                                    index=False)
  return csv


def test_small_image_warned_under_crop_pad_and_filled_by_resize(tmp_path, caplog):
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _one_image_tree(root, width=308, height=256)
  with caplog.at_level(logging.INFO, logger='forgetmi_jax'):
    crop = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  warned = [r for r in caplog.records if r.levelno == logging.WARNING
            and 'smaller than 2048' in r.getMessage()]
  assert len(warned) == 1 and ': 1 of 1 images' in warned[0].getMessage()
  x = crop.get_images([0])[0, ..., 0]
  cols, rows = np.flatnonzero(x.max(0) > 0), np.flatnonzero(x.max(1) > 0)
  assert len(cols) <= 6 and len(rows) <= 5  # 308x256 px fill ~5x4 of 32x32
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='forgetmi_jax'):
    fit = M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE, image_fit='resize')
  assert not [r for r in caplog.records if 'smaller than' in r.getMessage()]
  assert fit.images.build_key.startswith(f'img{SIZE}_resize_')
  assert fit.images.build_key != crop.images.build_key
  y = fit.get_images([0])[0, ..., 0]
  cols, rows = np.flatnonzero(y.max(0) > 0), np.flatnonzero(y.max(1) > 0)
  assert cols.tolist() == list(range(SIZE))  # the full width ...
  assert abs(len(rows) - SIZE * 256 / 308) <= 1.5  # ... and the aspect-kept height
  np.testing.assert_allclose(y[8:24, 2:30], 1.0, atol=0.02)
  with pytest.raises(ValueError, match=r"image_fit must be one of \('crop_pad', 'resize'\)"):
    M.load_mimic_cxr(csv, root, data_dir, image_size=SIZE, image_fit='stretch')


def test_preprocess_resize_against_block_means():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.1, 1.0, size=(64, 128)).astype(np.float32)  # h 64, w 128
  y = M.preprocess(x, 32, image_fit='resize')
  padded = np.zeros((128, 128), np.float64)
  padded[32:96] = x / x.max()  # centred in height, aspect kept
  expected = np.array([[padded[4 * i:4 * i + 4, 4 * j:4 * j + 4].mean() for j in range(32)]
                       for i in range(32)])
  np.testing.assert_allclose(y, expected, atol=1e-6)
  assert (y[:8] == 0).all() and (y[24:] == 0).all() and (y[8:24] > 0).all()
  # crop_pad of the same image: unscaled, centred in the 2048 square.
  z = M.preprocess(x, 2048)
  np.testing.assert_array_equal(z[992:1056, 960:1088], x / x.max())
  assert z.sum() == pytest.approx((x / x.max()).sum(), rel=1e-5)
  with pytest.raises(ValueError, match='image_fit must be one of'):
    M.preprocess(x, 32, image_fit='fit')


def test_leftovers_removed_live_builds_kept_and_modes_owner_only(tmp_path, caplog):
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _tree(root)
  name = M.config_name(csv, SIZE, mimic_root=root)
  os.makedirs(data_dir)
  stale = os.path.join(data_dir, f'{M.TMP_PREFIX}{name}-dead1')  # a killed build of ours
  other = os.path.join(data_dir, f'{M.TMP_PREFIX}img16_0123456789ab-dead2')  # another's, dead
  live = os.path.join(data_dir, f'{M.TMP_PREFIX}img64_ba9876543210-live3')  # running now
  for d in (stale, other, live):
    os.makedirs(os.path.join(d, M.DATASET_NAME))
    with open(os.path.join(d, M.DATASET_NAME, 'partial.array_record'), 'w') as f:
      f.write(SECRET)
  open(M._lock_path(data_dir, name), 'w').close()  # a stale lock file: must not block
  with M.build_lock(data_dir, 'img64_ba9876543210') as held:
    assert held
    final = M.build_mimic_cxr(csv, root, data_dir, image_size=SIZE)
    assert not os.path.exists(stale) and not os.path.exists(other)
    assert os.path.exists(live)  # its lock is held: a build in progress
  assert M.clean_stale_builds(data_dir, dry_run=True) == 1 and os.path.exists(live)
  assert M.clean_stale_builds(data_dir) == 1 and not os.path.exists(live)
  assert sorted(os.listdir(data_dir)) == [M.DATASET_NAME]  # no temp folder, no lock file
  # Everything the build wrote is owner-only.
  tree = os.path.join(data_dir, M.DATASET_NAME)
  modes = {p: stat.S_IMODE(os.stat(p).st_mode)
           for p in [tree] + [os.path.join(dp, n) for dp, dn, fn in os.walk(tree) for n in dn + fn]}
  assert any(p.endswith(M.META_FILE) for p in modes) and os.path.dirname(final) in modes
  for p, mode in modes.items():
    assert mode == (0o700 if os.path.isdir(p) else 0o600), (p, oct(mode))


def test_concurrent_builds_into_one_data_dir(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='forgetmi_jax')
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _tree(root)
  with concurrent.futures.ThreadPoolExecutor(2) as ex:
    futs = [ex.submit(M.build_mimic_cxr, csv, root, data_dir, SIZE) for _ in range(2)]
    paths = [f.result() for f in futs]
  assert paths[0] == paths[1] and M.is_complete(paths[0])
  assert len(_records(caplog, 'building')) == 1 and len(_records(caplog, 'reusing')) == 1
  assert sorted(os.listdir(data_dir)) == [M.DATASET_NAME]


KILLER = """
import os, signal, sys
from forgetmi_jax.data import mimic_cxr as M
csv, root, data_dir = sys.argv[1:4]
read, calls = M.read_pixels, []
def read_then_die(path, invert=True):
  calls.append(path)
  if len(calls) == 4:
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the tfds build
  return read(path, invert)
M.read_pixels = read_then_die
M.build_mimic_cxr(csv, root, data_dir, image_size=32, num_threads=1)
"""


def test_kill_9_during_build_leaves_nothing_after_the_next_build(tmp_path):
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _tree(root)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
  proc = subprocess.run([sys.executable, '-c', KILLER, csv, root, data_dir], env=env,
                        capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  left = [e for e in os.listdir(data_dir) if e.startswith(M.TMP_PREFIX)]
  assert len(left) == 1 and _leftovers(os.path.join(data_dir, left[0]))  # partial build
  final = M.build_mimic_cxr(csv, root, data_dir, image_size=SIZE)
  assert sorted(os.listdir(data_dir)) == [M.DATASET_NAME] and M.is_complete(final)
