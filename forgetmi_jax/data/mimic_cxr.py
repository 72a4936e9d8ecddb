"""The MIMIC-CXR edema subset from a user's local copy, preprocessed once into array_record.

Layout read (REFERENCE 1): `<mimic_root>/files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}`
with `.dcm` (MIMIC-CXR, read with pydicom) or `.jpg` / `.png` (MIMIC-CXR-JPG); reports from the
reference TSV (`idx \\t label \\t study_id \\t a \\t text`, no header) or from the raw
`<mimic_root>/files/p10/p10000032/s50414267.txt` files (FINDINGS and IMPRESSION sections,
lower-cased, numbers replaced by `NUMBER`).

Preprocessing (REFERENCE 1): pixels / image max -> [0, 1] (MONOCHROME1 DICOMs are inverted
first, as MIMIC-CXR-JPG does), then `image_fit='crop_pad'` (default, the paper's code): centre
crop or zero-pad to 2048x2048 without resizing, or `image_fit='resize'`: zero-pad the image to a
square (aspect kept) and scale that square to the output size; then an area (box) downsample to
`image_size` (2048 with crop_pad keeps the paper's exact input). Images smaller than 2048 px
under crop_pad fill only part of the frame: a warning counts them. Stored as uint16
(round(x * 65535), zlib-compressed tensors) and returned as float32 [0, 1] on read.

The build is a tensorflow-datasets `GeneratorBasedBuilder` (`manual_dir` = the MIMIC root)
writing `file_format='array_record'`; tfds 4.9.10 builds and reads array_record without
TensorFlow. A build is keyed by what it reads: the split rows, the resolved path, size and
mtime of every listed image (optionally its content hash), the content of every report file or
of the TSV, and the preprocessing settings; another tree or an edited file gives a new build.
Everything is validated before building (one error counting missing / unreadable files and
naming the first few). A build runs under a per-build lock file (fcntl) in a uniquely named
`.incomplete-<name>-*` folder of `data_dir` and is renamed into place at the end; leftovers of
a killed build (whose lock the kernel released) are removed before the next build or load.
What a build writes is owner-only (files 0600, folders 0700). Reading goes through
`tfds.data_source` (random access, no TensorFlow). Errors and logs name files, ids and counts
only, never report text or pixel values.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from forgetmi_jax.data.cohort import Cohort, LABEL_COLUMN, read_split_csv

log = logging.getLogger('forgetmi_jax')

DATASET_NAME = 'mimic_cxr_edema'
VERSION = '1.0.0'
PAPER_SIZE = 2048
PREPROCESS_VERSION = 'v1-max-crop2048-box-uint16'
IMAGE_FITS = ('crop_pad', 'resize')
IMAGE_EXTS = ('.dcm', '.jpg', '.jpeg', '.png')
META_FILE = 'cohort_rows.json'
TMP_PREFIX = '.incomplete-'  # <data_dir>/.incomplete-<build name>-<random>: a build in progress
LOCK_PREFIX = f'.lock-{DATASET_NAME}-'  # <data_dir>/.lock-mimic_cxr_edema-<build name>
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


def check_image_fit(image_fit: str) -> str:
  if image_fit not in IMAGE_FITS:
    raise ValueError(f'image_fit must be one of {IMAGE_FITS} (crop_pad: the paper\'s centre '
                     f'crop / zero-pad to {PAPER_SIZE} px; resize: scale to fit), '
                     f'got {image_fit!r}')
  return image_fit


def preprocess(x: np.ndarray, image_size: int, image_fit: str = 'crop_pad') -> np.ndarray:
  """REFERENCE 1: / max, fit to a square, box downsample to `image_size`. float32 [S, S].

  crop_pad: centre crop or zero-pad to 2048 square (the paper's code; small images stay small).
  resize: centre zero-pad to a square of the longer side (aspect kept), then scale it to
  `image_size` (box average when shrinking, bilinear when enlarging), so the image spans the
  frame along its longer side whatever its size.
  """
  check_image_fit(image_fit)
  m = float(x.max()) if x.size else 0.0
  if not np.isfinite(m) or m <= 0:
    raise ValueError('blank or invalid image (max <= 0)')
  x = x / m
  h, w = x.shape
  if image_fit == 'resize':
    side = max(h, w)
    out = np.zeros((side, side), np.float32)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = x
    return _square_resize(out, image_size)
  out = np.zeros((PAPER_SIZE, PAPER_SIZE), np.float32)
  sh, sw = max(0, (h - PAPER_SIZE) // 2), max(0, (w - PAPER_SIZE) // 2)  # crop offsets
  ch, cw = min(h, PAPER_SIZE), min(w, PAPER_SIZE)
  dh, dw = (PAPER_SIZE - ch) // 2, (PAPER_SIZE - cw) // 2  # pad offsets
  out[dh:dh + ch, dw:dw + cw] = x[sh:sh + ch, sw:sw + cw]
  return _square_resize(out, image_size)


def _square_resize(sq: np.ndarray, size: int) -> np.ndarray:
  """A square float32 image to size x size: exact block mean for integer factors, else PIL."""
  side = sq.shape[0]
  if side == size:
    return sq.astype(np.float32, copy=False)
  if side > size and side % size == 0:
    f = side // size
    return sq.reshape(size, f, size, f).mean(axis=(1, 3))
  from PIL import Image
  method = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(sq.astype(np.float32), mode='F').resize((size, size),
                                                                            method), np.float32)


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
def _resolve(split_csv, mimic_root, reports_tsv):
  """Rows, image paths, report texts and a digest of the report inputs, plus the problems
  found without decoding images (missing images, missing / unreadable / empty reports)."""
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
  studies = df.drop_duplicates('study_id')[['subject_id', 'study_id']]
  reports = {}
  digest = hashlib.sha1()
  if reports_tsv:
    tsv = read_reports_tsv(reports_tsv)
    digest.update(f'tsv|{os.path.realpath(reports_tsv)}|'.encode())
    digest.update(_file_digest(reports_tsv))
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
        with open(p, 'rb') as f:
          data = f.read()
        raw = data.decode('utf-8', errors='strict')
      except (OSError, UnicodeDecodeError) as e:
        problems.append((f'corrupt report: unreadable ({type(e).__name__})', p))
        continue
      digest.update(f'raw|{os.path.realpath(p)}|'.encode())
      digest.update(hashlib.sha1(data).digest())
      text = extract_sections(raw) or normalize_report(raw)
      if not text:
        problems.append(('corrupt report: empty', p))
      reports[int(st)] = text
  texts = [reports.get(int(s), '') for s in df['study_id']]
  return df, images, texts, digest.hexdigest(), problems, len(studies)


def _check_headers(images, num_threads=8):
  present = [p for p in images if p is not None]
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as ex:
    return [(f'corrupt image: {why}', p)
            for p, why in zip(present, ex.map(_check_image_header, present)) if why]


def _plan(split_csv, mimic_root, reports_tsv, check_headers=True, num_threads=8):
  """Resolve every row's image and report; raise one MimicDataError listing all problems."""
  df, images, reports, _, problems, n_studies = _resolve(split_csv, mimic_root, reports_tsv)
  if check_headers:
    problems += _check_headers(images, num_threads)
  if problems:
    raise _problems_error(problems, len(df), n_studies)
  return df, images, reports


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


# --------------------------------------------------------------------------------- cache key
def _file_digest(path, chunk=1 << 20) -> bytes:
  h = hashlib.sha1()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      h.update(block)
  return h.digest()


def _image_manifest(images, content_hash=False) -> str:
  """A digest of every image file's resolved path, size and mtime (and content when asked)."""
  h = hashlib.sha1()
  for p in images:
    st = os.stat(p)
    h.update(f'{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}\n'.encode())
    if content_hash:
      h.update(_file_digest(p))
  return h.hexdigest()


def _build_name(df, image_digest, report_digest, image_size, invert, image_fit) -> str:
  h = hashlib.sha1()
  h.update(df.to_csv(index=False).encode())
  h.update(f'|{int(image_size)}|{PREPROCESS_VERSION}|{bool(invert)}|{image_fit}|'.encode())
  h.update(image_digest.encode())
  h.update(report_digest.encode())
  fit = '' if image_fit == 'crop_pad' else f'{image_fit}_'
  return f'img{int(image_size)}_{fit}{h.hexdigest()[:12]}'


def config_name(split_csv, image_size, reports_tsv=None, invert_monochrome1=True, *,
                mimic_root=None, image_fit: str = 'crop_pad', content_hash: bool = False) -> str:
  """The build's name: `img<size>_[<fit>_]<hash of the split rows, settings and inputs>`.

  The inputs are the files the build reads, so `mimic_root` is required.
  """
  if mimic_root is None:
    raise ValueError('config_name needs mimic_root: builds are keyed by the image and report '
                     'files they read')
  check_image_fit(image_fit)
  df, images, _, report_digest, problems, n_studies = _resolve(split_csv, mimic_root,
                                                                reports_tsv)
  if problems:
    raise _problems_error(problems, len(df), n_studies)
  return _build_name(df, _image_manifest(images, content_hash), report_digest, image_size,
                     invert_monochrome1, image_fit)


# ------------------------------------------------------------------------ files, locks, modes
def restrict_permissions(path) -> int:
  """Owner-only access for patient data: files 0600, folders 0700, recursively.

  Symbolic links are neither followed nor changed. Returns the number of paths set.
  """
  path = os.fspath(path)
  if os.path.islink(path) or not os.path.exists(path):
    return 0
  if not os.path.isdir(path):
    os.chmod(path, 0o600)
    return 1
  os.chmod(path, 0o700)
  n = 1
  for folder, dirs, files in os.walk(path):
    for d in dirs:
      q = os.path.join(folder, d)
      if not os.path.islink(q):
        os.chmod(q, 0o700)
        n += 1
    for f in files:
      q = os.path.join(folder, f)
      if not os.path.islink(q):
        os.chmod(q, 0o600)
        n += 1
  return n


def _lock_path(data_dir, name) -> str:
  return os.path.join(os.fspath(data_dir), f'{LOCK_PREFIX}{name}')


@contextlib.contextmanager
def build_lock(data_dir, name, blocking: bool = True):
  """Hold the exclusive lock of build `name` in `data_dir` (fcntl.flock on a 0600 lock file).

  Yields True when held; with blocking=False yields False at once if another holder has it.
  The kernel releases the lock when its holder dies (kill -9 included), so a stale lock file
  never blocks anyone. The holder removes the file on release; a waiter that then wakes on
  the removed file retries on the path's current file (inode check), so two holders can
  never coexist.
  """
  os.makedirs(data_dir, exist_ok=True)
  path = _lock_path(data_dir, name)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      yield False
      return
    try:
      mine, now = os.fstat(fd), os.stat(path)
      if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
        break
    except FileNotFoundError:
      pass
    os.close(fd)  # the file was removed by its previous holder: lock the current one
  try:
    yield True
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    os.close(fd)


def tmp_build_name(entry: str) -> str | None:
  """`.incomplete-<name>-<random>` -> name (build names contain no '-')."""
  if not entry.startswith(TMP_PREFIX):
    return None
  return entry[len(TMP_PREFIX):].split('-', 1)[0] or None


def clean_stale_builds(data_dir, held=(), dry_run: bool = False) -> int:
  """Remove leftover `.incomplete-*` build folders of `data_dir` (a killed or failed build's
  partial images and report text); returns how many were (or, dry_run, would be) removed.

  A folder is stale when nobody holds its build's lock (or the caller holds it: `held` names).
  Folders of builds running now in other processes are kept.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    return 0
  by_name: dict = {}
  for entry in sorted(os.listdir(data_dir)):
    name = tmp_build_name(entry)
    if name is not None:
      by_name.setdefault(name, []).append(os.path.join(data_dir, entry))
  removed = 0
  for name, paths in by_name.items():
    with contextlib.ExitStack() as stack:
      if name not in held and not stack.enter_context(build_lock(data_dir, name, blocking=False)):
        continue  # a live build
      for p in paths:
        removed += 1
        if not dry_run:
          if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
          else:
            os.remove(p)
  if removed and not dry_run:
    log.info('%s: removed %d leftover partial build folder(s)', data_dir, removed)
  return removed


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
    """MIMIC-CXR pulmonary edema subset (images, reports, labels, ids, folds).

    Examples come from a validated plan (df, image paths, reports: decoded and preprocessed
    here) or, for rewriting a build (purge), from `examples()`: (key, feature dict) pairs.
    """
    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
      # No checksums / metadata files next to the code (and tfds' lookup of them inside a
      # package needs the optional `importlib_resources`).
      return None

    def __init__(self, *, image_size, plan=None, examples=None, num_threads=4,
                 invert_monochrome1=True, image_fit='crop_pad', **kwargs):
      if (plan is None) == (examples is None):
        raise ValueError('give exactly one of plan and examples')
      self._plan_rows = plan
      self._examples = examples
      self._image_size = int(image_size)
      self._threads = int(num_threads)
      self._invert = bool(invert_monochrome1)
      self._fit = check_image_fit(image_fit)
      self.failures = []
      self.num_small = 0  # images smaller than PAPER_SIZE in height or width
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
      if self._examples is not None:
        return {'train': self._examples()}
      return {'train': self._generate_examples()}

    def _load(self, i):
      df, images, _ = self._plan_rows
      try:
        x = read_pixels(images[i], self._invert)
        small = min(x.shape) < PAPER_SIZE
        return _to_uint16(preprocess(x, self._image_size, self._fit))[..., None], None, small
      except Exception as e:  # pylint: disable=broad-except
        return None, f'{type(e).__name__}', False

    def _generate_examples(self):
      df, images, reports = self._plan_rows
      n = len(df)
      blank = np.zeros((self._image_size, self._image_size, 1), np.uint16)
      for i, (img, err, small) in enumerate(_bounded_map(self._load, range(n), self._threads)):
        self.num_small += int(small)
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


def write_build(tmp_dir, name, image_size, *, manual_dir=None, **builder_kwargs):
  """Run the tfds builder into `tmp_dir`; returns (builder, the built version folder in it).

  `builder_kwargs`: plan= or examples= (see the builder), num_threads, invert_monochrome1,
  image_fit. The caller owns `tmp_dir` (and removes it).
  """
  import tensorflow_datasets as tfds
  builder = _builder_class()(
      image_size=image_size, data_dir=tmp_dir, file_format='array_record',
      config=tfds.core.BuilderConfig(name=name, description=f'{image_size}px'), **builder_kwargs)
  builder.download_and_prepare(
      download_dir=os.path.join(tmp_dir, 'downloads'),
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir or tmp_dir)))
  return builder, os.path.join(tmp_dir, DATASET_NAME, name, VERSION)


def is_complete(final) -> bool:
  return os.path.isfile(os.path.join(os.fspath(final), META_FILE))


def read_meta(final) -> dict:
  with open(os.path.join(os.fspath(final), META_FILE), encoding='utf-8') as f:
    return json.load(f)


def _warn_small(meta, where):
  n_small = int(meta.get('num_small', 0))
  if n_small and meta.get('image_fit', 'crop_pad') == 'crop_pad':
    log.warning('%s: %d of %d images are smaller than %d px in height or width and were '
                'zero-padded, not scaled (image_fit=crop_pad, the paper\'s preprocessing); '
                'image_fit=resize scales each image to fill the frame', where, n_small,
                int(meta['num_examples']), PAPER_SIZE)


def install_build(built, final):
  """Owner-only modes, then rename the complete folder `built` into place at `final`."""
  restrict_permissions(built)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  for d in (os.path.dirname(os.path.dirname(final)), os.path.dirname(final)):
    os.chmod(d, 0o700)  # <data_dir>/mimic_cxr_edema and its build-name folder
  if os.path.lexists(final):  # an incomplete leftover (no META_FILE): we hold the lock
    shutil.rmtree(final, ignore_errors=True)
  os.replace(built, final)


def build_mimic_cxr(split_csv, mimic_root, data_dir, image_size: int = 256, reports_tsv=None,
                    num_threads: int = 4, invert_monochrome1: bool = True, *,
                    image_fit: str = 'crop_pad', content_hash: bool = False) -> str:
  """Validate, preprocess and write the array_record dataset once; returns its folder.

  An existing complete build with the same key is reused (logged at INFO): the key covers the
  split rows, image size, image_fit, preprocessing, report contents (raw files or TSV) and
  every image's resolved path, size and mtime (`content_hash=True`: also its SHA-1, which
  reads every image on each call). Concurrent calls on one `data_dir` are safe: a build holds
  its lock file, a second caller of the same build waits and then reuses it.
  """
  if not 16 <= int(image_size) <= PAPER_SIZE:
    raise ValueError(f'image_size must lie in [16, {PAPER_SIZE}], got {image_size}')
  check_image_fit(image_fit)
  data_dir = os.fspath(data_dir)
  df, images, reports, report_digest, problems, n_studies = _resolve(split_csv, mimic_root,
                                                                      reports_tsv)
  if problems:
    raise _problems_error(problems + _check_headers(images), len(df), n_studies)
  stats = _image_manifest(images)
  image_digest = _image_manifest(images, True) if content_hash else stats
  name = _build_name(df, image_digest, report_digest, image_size, invert_monochrome1, image_fit)
  final = os.path.join(data_dir, DATASET_NAME, name, VERSION)
  if is_complete(final):
    clean_stale_builds(data_dir)
    log.info('MIMIC-CXR: reusing cached build %s (%d images)', final, len(df))
    _warn_small(read_meta(final), final)
    return final
  os.makedirs(data_dir, exist_ok=True)
  with build_lock(data_dir, name):
    clean_stale_builds(data_dir, held=(name,))
    if is_complete(final):  # another process finished this build while we waited
      log.info('MIMIC-CXR: reusing cached build %s (%d images)', final, len(df))
      _warn_small(read_meta(final), final)
      return final
    problems = _check_headers(images)
    if problems:
      raise _problems_error(problems, len(df), n_studies)
    log.info('MIMIC-CXR: building %s (%d images, %d px, image_fit=%s)', final, len(df),
             int(image_size), image_fit)
    tmp = tempfile.mkdtemp(prefix=f'{TMP_PREFIX}{name}-', dir=data_dir)
    try:
      builder, built = write_build(tmp, name, image_size, manual_dir=mimic_root,
                                   plan=(df, images, reports), num_threads=num_threads,
                                   invert_monochrome1=invert_monochrome1, image_fit=image_fit)
      if builder.failures:
        raise _problems_error(builder.failures, len(df), n_studies)
      if _image_manifest(images) != stats:
        raise MimicDataError(f'image files under {os.fspath(mimic_root)} changed during the '
                             f'build (size or mtime); nothing was built, run it again')
      meta = {'image_size': int(image_size), 'preprocess': PREPROCESS_VERSION,
              'image_fit': image_fit, 'build_key': name, 'num_examples': len(df),
              'num_small': int(builder.num_small), 'purged_rows': 0,
              'subject_id': df['subject_id'].astype(int).tolist(),
              'study_id': df['study_id'].astype(int).tolist(),
              'dicom_id': df['dicom_id'].astype(str).tolist(),
              'label': df[LABEL_COLUMN].astype(int).tolist(),
              'fold': df['fold'].astype(str).tolist(), 'report': list(reports)}
      with open(os.path.join(built, META_FILE), 'w', encoding='utf-8') as f:
        json.dump(meta, f)
      install_build(built, final)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  _warn_small(meta, final)
  return final


class ArrayRecordImages:
  """Lazy images from the tfds data source: `[idx] -> float32 [b, S, S, 1]` in [0, 1].

  `build_key`: the build's content key (see `open_build`), for cache keys of whatever is
  derived from these images.
  """
  storage_dtype = 'uint16'  # what the build stores: a device copy in uint16 is lossless

  def __init__(self, source, image_size: int, build_key: str | None = None):
    self.source = source
    self.shape = (len(source), image_size, image_size, 1)
    self.dtype = np.float32
    self.build_key = build_key

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


def open_source(final):
  """The build's random-access tfds data source (split 'train', records in row order)."""
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(os.fspath(final)).as_data_source(split='train')


def record_text(v) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


def open_build(final) -> Cohort:
  """The cohort stored in a build folder (checked against its row metadata).

  `cohort.content_key` (= `cohort.images.build_key`): the build name (a hash of everything the
  build read), plus a hash of the remaining rows once subjects were purged from it.
  """
  final = os.fspath(final)
  source = open_source(final)
  meta = read_meta(final)
  n = meta['num_examples']
  if len(source) != n:
    raise MimicDataError(f'{final}: {len(source)} records but {n} rows in {META_FILE}; '
                         f'delete the folder to rebuild')
  for i in sorted({0, n - 1}) if n else ():  # records in row order: spot-check both ends
    rec = source[i]
    if record_text(rec['dicom_id']) != meta['dicom_id'][i] or int(rec['index']) != i:
      raise MimicDataError(f'{final}: record {i} does not match its row; delete the folder '
                           f'to rebuild')
  key = meta.get('build_key', os.path.basename(os.path.dirname(final)))
  if meta.get('purged_rows'):  # same build name, fewer rows: a different content key
    key += '-' + hashlib.sha1('\n'.join(meta['dicom_id']).encode()).hexdigest()[:8]
  cohort = Cohort(images=ArrayRecordImages(source, meta['image_size'], key),
                  reports=meta['report'], labels=np.asarray(meta['label'], np.int32),
                  subject_id=np.asarray(meta['subject_id'], np.int64),
                  study_id=np.asarray(meta['study_id'], np.int64),
                  dicom_id=np.asarray(meta['dicom_id']), fold=np.asarray(meta['fold']))
  cohort.content_key = key  # what the rows are made of: for keys of caches derived from them
  return cohort


def load_mimic_cxr(split_csv, mimic_root, data_dir, image_size: int = 256, reports_tsv=None,
                   num_threads: int = 4, invert_monochrome1: bool = True, *,
                   image_fit: str = 'crop_pad', content_hash: bool = False) -> Cohort:
  """The edema cohort with lazy images read from the (built-once) array_record dataset.

  image_fit: 'crop_pad' (the paper: centre crop / zero-pad to 2048 px) or 'resize' (scale
  each image to fit, aspect kept). See `build_mimic_cxr` for the cache key.
  """
  final = build_mimic_cxr(split_csv, mimic_root, data_dir, image_size, reports_tsv,
                          num_threads=num_threads, invert_monochrome1=invert_monochrome1,
                          image_fit=image_fit, content_hash=content_hash)
  meta = read_meta(final)
  if meta.get('purged_rows'):
    log.warning('%s: %d row(s) of the split file were purged from this build '
                '(purge_subjects) and are not in the cohort', final, int(meta['purged_rows']))
  return open_build(final)
