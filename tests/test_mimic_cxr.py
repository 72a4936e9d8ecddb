"""The MIMIC-CXR loader on a tiny fabricated tree in the MIMIC layout (written here)."""
import os

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
