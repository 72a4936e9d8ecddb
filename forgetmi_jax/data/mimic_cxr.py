"""The MIMIC-CXR edema subset from a user's local copy, preprocessed once into array_record.

Layout read (REFERENCE 1): `<mimic_root>/files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}`
with `.dcm` (MIMIC-CXR, read with pydicom) or `.jpg` / `.png` (MIMIC-CXR-JPG); reports from the
reference TSV (`idx \\t label \\t study_id \\t a \\t text`, no header) or from the raw
`<mimic_root>/files/p10/p10000032/s50414267.txt` files (FINDINGS and IMPRESSION sections,
lower-cased, numbers replaced by `NUMBER`).

Preprocessing (REFERENCE 1): pixels / image max -> [0, 1] (MONOCHROME1 DICOMs are inverted
first, as MIMIC-CXR-JPG does), centre crop or zero-pad to 2048x2048, then an area (box)
downsample to `image_size` (2048 keeps the paper's exact input). Stored as uint16
(round(x * 65535), zlib-compressed tensors) and returned as float32 [0, 1] on read.

The build is a tensorflow-datasets `GeneratorBasedBuilder` (`manual_dir` = the MIMIC root)
writing `file_format='array_record'`; tfds 4.9.10 builds and reads array_record without
TensorFlow. Everything is validated before building (one error counting missing / unreadable
files and naming the first few), built under a temporary folder of `data_dir` and renamed into
place at the end, so an interrupted or failed build leaves nothing behind. Reading goes through
`tfds.data_source` (random access, no TensorFlow). Errors and logs name files and ids only,
never report text or pixel values.
"""
from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from forgetmi_jax.data.cohort import Cohort, LABEL_COLUMN, read_split_csv

DATASET_NAME = 'mimic_cxr_edema'
VERSION = '1.0.0'
PAPER_SIZE = 2048
PREPROCESS_VERSION = 'v1-max-crop2048-box-uint16'
IMAGE_EXTS = ('.dcm', '.jpg', '.jpeg', '.png')
META_FILE = 'cohort_rows.json'
MAX_NAMED = 5

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MIMIC-CXR is credentialed data (PhysioNet). Download MIMIC-CXR (DICOM) or MIMIC-CXR-JPG and,
for raw reports, mimic-cxr-reports; point `mimic_root` (the builder's manual_dir) at the folder
that holds `files/p10/p10000032/s50414267/<dicom_id>.dcm|.jpg|.png` and
`files/p10/p10000032/s50414267.txt`. Alternatively give the reference TSV of normalised reports
(`reports_tsv`). The split file (`mimic-cxr-sub-img-edema-split-manualtest.csv`) selects the
6,742 edema images and their labels and folds.
"""


class MimicDataError(ValueError):
  """Missing or unreadable inputs (the message names files and ids, never content)."""


# ------------------------------------------------------------------------------------- paths
def study_dir(mimic_root, subject_id: int, study_id: int) -> str:
  s = str(int(subject_id))
  return os.path.join(os.fspath(mimic_root), 'files', f'p{s[:2]}', f'p{s}', f's{int(study_id)}')


def report_path(mimic_root, subject_id: int, study_id: int) -> str:
  return study_dir(mimic_root, subject_id, study_id) + '.txt'


def find_image(mimic_root, subject_id: int, study_id: int, dicom_id: str) -> str | None:
  base = os.path.join(study_dir(mimic_root, subject_id, study_id), dicom_id)
  for ext in IMAGE_EXTS:
    if os.path.isfile(base + ext):
      return base + ext
  return None


# ----------------------------------------------------------------------------------- reports
_HEADER = re.compile(r'^\s*([A-Z][A-Z /&()-]{2,40}):', re.MULTILINE)
_NUMBER = re.compile(r'(?<![a-z])\d+(?:[.,:/]\d+)*(?:st|nd|rd|th)?')
_KEEP = re.compile(r'[^a-zA-Z0-9.,:;%/\-\[\] ]+')


def normalize_report(text: str) -> str:
  """Lower-case, numbers -> NUMBER, de-identification blanks and odd symbols removed."""
  t = text.lower().replace('___', ' ')
  t = _NUMBER.sub(' NUMBER ', t)
  t = _KEEP.sub(' ', t.replace('\n', ' '))
  t = re.sub(r'\s*([.,:;])\s*', r' \1 ', t)
  t = re.sub(r'(?:\.\s*){2,}', '. ', t)
  return re.sub(r'\s+', ' ', t).strip()


def extract_sections(raw: str) -> str:
  """FINDINGS and IMPRESSION of a raw MIMIC-CXR report, normalised; '' when neither exists."""
  heads = list(_HEADER.finditer(raw))
  parts = []
  for name in ('FINDINGS', 'IMPRESSION'):
    for i, m in enumerate(heads):
      if m.group(1).strip() == name:
        end = heads[i + 1].start() if i + 1 < len(heads) else len(raw)
        body = normalize_report(raw[m.end():end])
        if body:
          parts.append(f'{name.lower()} : {body}')
        break
  return ' '.join(parts)


def read_reports_tsv(path) -> dict[int, str]:
  """study_id -> text from the reference TSV (`idx, label, study_id, 'a', text`, no header)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'reports TSV not found: {path}')
  out = {}
  with open(path, newline='', encoding='utf-8') as f:
    for line_no, row in enumerate(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 1):
      if not row or not ''.join(row).strip():
        continue
      if len(row) < 5:
        raise MimicDataError(f'{path}, line {line_no}: expected 5 tab-separated fields '
                             f'(idx, label, study_id, a, text), found {len(row)}')
      sid = row[2].strip().lstrip('sS')
      if not sid.isdigit():
        raise MimicDataError(f'{path}, line {line_no}, field study_id: not an integer id')
      text = '\t'.join(row[4:])
      out[int(sid)] = re.sub(r'\s+', ' ', _NUMBER.sub('NUMBER', text)).strip()
  return out


# ------------------------------------------------------------------------------------ images
def read_pixels(path: str, invert_monochrome1: bool = True) -> np.ndarray:
  """Raw pixels as float32 [H, W] (DICOM via pydicom, JPG/PNG via PIL)."""
  if path.lower().endswith('.dcm'):
    import pydicom
    ds = pydicom.dcmread(path)
    x = np.asarray(ds.pixel_array, np.float32)
    if x.ndim == 3:  # multi-frame or colour: first frame / channel mean
      x = x[0] if ds.get('NumberOfFrames', 1) > 1 else x.mean(-1)
    if invert_monochrome1 and str(ds.get('PhotometricInterpretation', '')) == 'MONOCHROME1':
      x = x.max() - x
    return x
  from PIL import Image
  with Image.open(path) as im:
    if im.mode in ('RGB', 'RGBA', 'P', 'LA', 'CMYK'):
      im = im.convert('L')
    x = np.asarray(im, np.float32)
  return x if x.ndim == 2 else x.mean(-1)


def preprocess(x: np.ndarray, image_size: int) -> np.ndarray:
  """REFERENCE 1: / max, centre crop or zero-pad to 2048 square, box downsample. float32 [S,S]."""
  m = float(x.max()) if x.size else 0.0
  if not np.isfinite(m) or m <= 0:
    raise ValueError('blank or invalid image (max <= 0)')
  x = x / m
  out = np.zeros((PAPER_SIZE, PAPER_SIZE), np.float32)
  h, w = x.shape
  sh, sw = max(0, (h - PAPER_SIZE) // 2), max(0, (w - PAPER_SIZE) // 2)  # crop offsets
  ch, cw = min(h, PAPER_SIZE), min(w, PAPER_SIZE)
  dh, dw = (PAPER_SIZE - ch) // 2, (PAPER_SIZE - cw) // 2  # pad offsets
  out[dh:dh + ch, dw:dw + cw] = x[sh:sh + ch, sw:sw + cw]
  if image_size == PAPER_SIZE:
    return out
  if PAPER_SIZE % image_size == 0:
    f = PAPER_SIZE // image_size
    return out.reshape(image_size, f, image_size, f).mean(axis=(1, 3))
  from PIL import Image
  return np.asarray(Image.fromarray(out, mode='F').resize((image_size, image_size),
                                                          Image.Resampling.BOX), np.float32)


def _to_uint16(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0, 1) * 65535).astype(np.uint16)


def _check_image_header(path: str) -> str | None:
  """Cheap readability check before building; returns a reason or None."""
  try:
    if path.lower().endswith('.dcm'):
      import pydicom
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      if 'Rows' not in ds or 'Columns' not in ds:
        return 'DICOM without image size'
      if os.path.getsize(path) < 128:
        return 'truncated DICOM'
    else:
      from PIL import Image
      with Image.open(path) as im:
        im.verify()
  except Exception as e:  # pylint: disable=broad-except
    return f'unreadable ({type(e).__name__})'
  return None


# ------------------------------------------------------------------------------- validation
def _plan(split_csv, mimic_root, reports_tsv, check_headers=True, num_threads=8):
  """Resolve every row's image and report; raise one MimicDataError listing all problems."""
  df = read_split_csv(split_csv)
  mimic_root = os.fspath(mimic_root)
  if not os.path.isdir(mimic_root):
    raise FileNotFoundError(f'MIMIC root not found: {mimic_root}')
  problems = []  # (kind, where)
  images = []
  for sub, st, dic in zip(df['subject_id'], df['study_id'], df['dicom_id']):
    p = find_image(mimic_root, sub, st, dic)
    images.append(p)
    if p is None:
      problems.append(('missing image', os.path.join(study_dir(mimic_root, sub, st), dic)
                       + '.{dcm,jpg,png}'))
  if check_headers:
    present = [p for p in images if p is not None]
    with concurrent.futures.ThreadPoolExecutor(num_threads) as ex:
      for p, why in zip(present, ex.map(_check_image_header, present)):
        if why:
          problems.append((f'corrupt image: {why}', p))
  studies = df.drop_duplicates('study_id')[['subject_id', 'study_id']]
  reports = {}
  if reports_tsv:
    tsv = read_reports_tsv(reports_tsv)
    for sub, st in zip(studies['subject_id'], studies['study_id']):
      text = tsv.get(int(st), '')
      if not text:
        problems.append(('missing report', f'{os.fspath(reports_tsv)} (study_id {st})'))
      reports[int(st)] = text
  else:
    for sub, st in zip(studies['subject_id'], studies['study_id']):
      p = report_path(mimic_root, sub, st)
      if not os.path.isfile(p):
        problems.append(('missing report', p))
        continue
      try:
        with open(p, encoding='utf-8', errors='strict') as f:
          raw = f.read()
      except (OSError, UnicodeDecodeError) as e:
        problems.append((f'corrupt report: unreadable ({type(e).__name__})', p))
        continue
      text = extract_sections(raw) or normalize_report(raw)
      if not text:
        problems.append(('corrupt report: empty', p))
      reports[int(st)] = text
  if problems:
    raise _problems_error(problems, len(df), len(studies))
  return df, images, [reports[int(s)] for s in df['study_id']]


def _problems_error(problems, n_images, n_studies):
  kinds = {}
  for kind, _ in problems:
    kinds[kind.split(':')[0]] = kinds.get(kind.split(':')[0], 0) + 1
  counts = ', '.join(f'{v} {k}{"s" if v > 1 else ""}' for k, v in sorted(kinds.items()))
  named = '\n'.join(f'  {kind}: {where}' for kind, where in problems[:MAX_NAMED])
  more = f'\n  ... and {len(problems) - MAX_NAMED} more' if len(problems) > MAX_NAMED else ''
  return MimicDataError(f'{len(problems)} problem(s) with the MIMIC-CXR inputs '
                        f'({n_images} images, {n_studies} studies): {counts}. First ones:\n'
                        f'{named}{more}\nNothing was built.')


# ------------------------------------------------------------------------------------ builder
def _bounded_map(fn, items, num_threads):
  """Ordered parallel map holding at most 2 * num_threads results (2048 px images are big)."""
  items = list(items)
  window = max(1, 2 * int(num_threads))
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as ex:
    pending = [ex.submit(fn, x) for x in items[:window]]
    nxt = len(pending)
    while pending:
      head = pending.pop(0)
      if nxt < len(items):
        pending.append(ex.submit(fn, items[nxt]))
        nxt += 1
      yield head.result()


_BUILDER_CLASS = None


def _builder_class():
  """The tfds builder, defined on first use so importing this module does not import tfds."""
  global _BUILDER_CLASS
  if _BUILDER_CLASS is not None:
    return _BUILDER_CLASS
  import tensorflow_datasets as tfds

  class MimicCxrEdema(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MIMIC-CXR pulmonary edema subset (images, reports, labels, ids, folds)."""
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
      # No checksums / metadata files next to the code (and tfds' lookup of them inside a
      # package needs the optional `importlib_resources`).
      return None

    def __init__(self, *, plan, image_size, num_threads=4, invert_monochrome1=True, **kwargs):
      self._plan_rows = plan
      self._image_size = int(image_size)
      self._threads = int(num_threads)
      self._invert = bool(invert_monochrome1)
      self.failures = []
      super().__init__(**kwargs)

    def _info(self):
      s = self._image_size
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,  # records stay in split-file row order
          description='MIMIC-CXR edema severity subset preprocessed as in Forget-MI.',
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint16,
                                            encoding=tfds.features.Encoding.ZLIB),
              'report': tfds.features.Text(),
              'label': tfds.features.Scalar(dtype=np.int32),
              'subject_id': tfds.features.Scalar(dtype=np.int64),
              'study_id': tfds.features.Scalar(dtype=np.int64),
              'dicom_id': tfds.features.Text(),
              'fold': tfds.features.Text(),
              'index': tfds.features.Scalar(dtype=np.int64),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager  # inputs come from the validated plan (manual_dir = the MIMIC root)
      return {'train': self._generate_examples()}

    def _load(self, i):
      df, images, _ = self._plan_rows
      try:
        x = preprocess(read_pixels(images[i], self._invert), self._image_size)
        return _to_uint16(x)[..., None], None
      except Exception as e:  # pylint: disable=broad-except
        return None, f'{type(e).__name__}'

    def _generate_examples(self):
      df, images, reports = self._plan_rows
      n = len(df)
      blank = np.zeros((self._image_size, self._image_size, 1), np.uint16)
      for i, (img, err) in enumerate(_bounded_map(self._load, range(n), self._threads)):
        if err:
          self.failures.append((f'corrupt image: cannot decode ({err})', images[i]))
          img = blank  # the build is discarded below; keep going to report every failure
        yield i, {'image': img, 'report': reports[i],
                  'label': int(df[LABEL_COLUMN].iloc[i]),
                  'subject_id': int(df['subject_id'].iloc[i]),
                  'study_id': int(df['study_id'].iloc[i]),
                  'dicom_id': str(df['dicom_id'].iloc[i]), 'fold': str(df['fold'].iloc[i]),
                  'index': i}

  _BUILDER_CLASS = MimicCxrEdema
  return MimicCxrEdema


def _fingerprint(split_df, image_size, reports_tsv, invert) -> str:
  h = hashlib.sha1()
  h.update(split_df.to_csv(index=False).encode())
  h.update(f'{image_size}|{PREPROCESS_VERSION}|{invert}'.encode())
  if reports_tsv:
    with open(reports_tsv, 'rb') as f:
      h.update(hashlib.sha1(f.read()).digest())
  else:
    h.update(b'raw-reports')
  return h.hexdigest()[:12]


def config_name(split_csv, image_size, reports_tsv=None, invert_monochrome1=True) -> str:
  return (f'img{int(image_size)}_'
          f'{_fingerprint(read_split_csv(split_csv), image_size, reports_tsv, invert_monochrome1)}')


def build_mimic_cxr(split_csv, mimic_root, data_dir, image_size: int = 256, reports_tsv=None,
                    num_threads: int = 4, invert_monochrome1: bool = True) -> str:
  """Validate, preprocess and write the array_record dataset once; returns its folder.

  An existing complete build with the same fingerprint (split file, image size, report
  source, preprocessing) is reused.
  """
  if not 16 <= int(image_size) <= PAPER_SIZE:
    raise ValueError(f'image_size must lie in [16, {PAPER_SIZE}], got {image_size}')
  data_dir = os.fspath(data_dir)
  name = config_name(split_csv, image_size, reports_tsv, invert_monochrome1)
  final = os.path.join(data_dir, DATASET_NAME, name, VERSION)
  if os.path.isfile(os.path.join(final, META_FILE)):
    return final
  plan = _plan(split_csv, mimic_root, reports_tsv)
  import tensorflow_datasets as tfds
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.incomplete-{name}-', dir=data_dir)
  try:
    builder = _builder_class()(
        plan=plan, image_size=image_size, num_threads=num_threads,
        invert_monochrome1=invert_monochrome1, data_dir=tmp, file_format='array_record',
        config=tfds.core.BuilderConfig(name=name, description=f'{image_size}px'))
    builder.download_and_prepare(
        download_dir=os.path.join(tmp, 'downloads'),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(mimic_root)))
    if builder.failures:
      df = plan[0]
      raise _problems_error(builder.failures, len(df), df['study_id'].nunique())
    built = os.path.join(tmp, DATASET_NAME, name, VERSION)
    df, _, reports = plan
    meta = {'image_size': int(image_size), 'preprocess': PREPROCESS_VERSION,
            'num_examples': len(df), 'subject_id': df['subject_id'].astype(int).tolist(),
            'study_id': df['study_id'].astype(int).tolist(),
            'dicom_id': df['dicom_id'].astype(str).tolist(),
            'label': df[LABEL_COLUMN].astype(int).tolist(),
            'fold': df['fold'].astype(str).tolist(), 'report': list(reports)}
    with open(os.path.join(built, META_FILE), 'w', encoding='utf-8') as f:
      json.dump(meta, f)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):  # someone else finished the same build meanwhile
      shutil.rmtree(tmp, ignore_errors=True)
      return final
    os.replace(built, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


class ArrayRecordImages:
  """Lazy images from the tfds data source: `[idx] -> float32 [b, S, S, 1]` in [0, 1]."""

  def __init__(self, source, image_size: int):
    self.source = source
    self.shape = (len(source), image_size, image_size, 1)
    self.dtype = np.float32

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, idx):
    arr = np.asarray(idx)
    if isinstance(idx, slice):
      arr = np.arange(len(self))[idx]
    single = arr.ndim == 0
    arr = arr.reshape(-1).astype(np.int64)
    uniq, inv = np.unique(arr, return_inverse=True)  # padded batches repeat an index
    recs = self.source.__getitems__(uniq.tolist()) if len(uniq) else []
    imgs = np.stack([np.asarray(r['image']) for r in recs]) if recs else \
        np.zeros((0,) + self.shape[1:], np.uint16)
    out = imgs[inv].astype(np.float32) / 65535.0
    return out[0] if single else out


def load_mimic_cxr(split_csv, mimic_root, data_dir, image_size: int = 256, reports_tsv=None,
                   num_threads: int = 4, invert_monochrome1: bool = True) -> Cohort:
  """The edema cohort with lazy images read from the (built-once) array_record dataset."""
  final = build_mimic_cxr(split_csv, mimic_root, data_dir, image_size, reports_tsv,
                          num_threads=num_threads, invert_monochrome1=invert_monochrome1)
  import tensorflow_datasets as tfds
  name = os.path.basename(os.path.dirname(final))
  source = tfds.data_source(f'{DATASET_NAME}/{name}:{VERSION}', split='train',
                            data_dir=os.fspath(data_dir), download=False)
  with open(os.path.join(final, META_FILE), encoding='utf-8') as f:
    meta = json.load(f)
  n = meta['num_examples']
  if len(source) != n:
    raise MimicDataError(f'{final}: {len(source)} records but {n} rows in {META_FILE}; '
                         f'delete the folder to rebuild')
  for i in {0, n - 1}:  # records are in row order (disable_shuffling): spot-check both ends
    rec = source[i]
    did = rec['dicom_id'].decode() if isinstance(rec['dicom_id'], bytes) else rec['dicom_id']
    if did != meta['dicom_id'][i] or int(rec['index']) != i:
      raise MimicDataError(f'{final}: record {i} does not match its row; delete the folder '
                           f'to rebuild')
  return Cohort(images=ArrayRecordImages(source, meta['image_size']), reports=meta['report'],
                labels=np.asarray(meta['label'], np.int32),
                subject_id=np.asarray(meta['subject_id'], np.int64),
                study_id=np.asarray(meta['study_id'], np.int64),
                dicom_id=np.asarray(meta['dicom_id']), fold=np.asarray(meta['fold']))
