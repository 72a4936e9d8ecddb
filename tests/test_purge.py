"""Purging subjects from the preprocessed MIMIC builds, and owner-only file modes."""
import logging
import os
import stat

import numpy as np
import pytest

from forgetmi_jax.data import mimic_cxr as M
from forgetmi_jax.data.purge import PurgeSummary, find_builds, purge_subjects, restrict_permissions
from tests.test_mimic_cxr import ROWS, SECRET, SIZE, _tree

GONE = 10000032  # 3 of the 5 rows (two studies)


def _all_records(final):
  source = M.open_source(final)
  return [source[i] for i in range(len(source))]


def _modes(top):
  out = {top: stat.S_IMODE(os.stat(top).st_mode)}
  for dp, dn, fn in os.walk(top):
    for n in dn + fn:
      out[os.path.join(dp, n)] = stat.S_IMODE(os.stat(os.path.join(dp, n)).st_mode)
  return out


def test_purge_removes_only_those_subjects_in_every_build(tmp_path, caplog):
  root, cache = str(tmp_path / 'mimic'), tmp_path / 'cache'
  data_dir = str(cache / 'tfds')
  csv = _tree(root)
  before = {s: M.load_mimic_cxr(csv, root, data_dir, image_size=s) for s in (SIZE, 16)}
  finals = sorted(find_builds(str(cache)))
  assert len(finals) == 2
  keep = [i for i, r in enumerate(ROWS) if r[0] != GONE]
  stale = os.path.join(data_dir, f'{M.TMP_PREFIX}img64_0123456789ab-dead')  # a killed build
  os.makedirs(stale)
  dry = purge_subjects(str(cache), [GONE, 99999999], dry_run=True)
  assert dry == PurgeSummary(subjects_requested=2, subjects_found=1, builds_scanned=2,
                             builds_rewritten=2, rows_removed=6, rows_kept=4, stale_removed=1,
                             dry_run=True)
  assert os.path.exists(stale) and len(_all_records(finals[0])) == len(ROWS)  # untouched
  with caplog.at_level(logging.INFO, logger='forgetmi_jax'):
    summary = purge_subjects(str(cache), [str(GONE)])
  assert (summary.rows_removed, summary.builds_rewritten, summary.rows_kept) == (6, 2, 4)
  assert summary.stale_removed == 1 and not os.path.exists(stale)
  assert str(GONE) not in caplog.text and SECRET not in caplog.text
  assert 'removed 6 row(s) from 2 of 2 build(s)' in str(summary)
  assert sorted(find_builds(str(cache))) == finals
  for size, old in before.items():
    final = M.build_mimic_cxr(csv, root, data_dir, image_size=size)  # same key: reused
    assert final in finals
    recs = _all_records(final)
    assert len(recs) == len(keep) and all(int(r['subject_id']) != GONE for r in recs)
    assert [int(r['index']) for r in recs] == list(range(len(keep)))
    new = M.load_mimic_cxr(csv, root, data_dir, image_size=size)
    assert GONE not in new.subject_id and len(new) == len(keep)
    assert new.content_key == new.images.build_key != old.content_key
    assert old.content_key == M.read_meta(final)['build_key'] and \
        new.content_key.startswith(old.content_key)
    np.testing.assert_array_equal(new.get_images(np.arange(len(keep))),
                                  old.get_images(np.asarray(keep)))
    for col in ('subject_id', 'study_id', 'dicom_id', 'labels', 'fold'):
      np.testing.assert_array_equal(getattr(new, col), getattr(old, col)[keep])
    assert list(new.reports) == [old.reports[i] for i in keep]
    assert [M.record_text(r['report']) for r in recs] == list(new.reports)
    assert M.read_meta(final)['purged_rows'] == 3
    modes = _modes(final)
    assert all(m == (0o700 if os.path.isdir(p) else 0o600) for p, m in modes.items()), modes
  assert sorted(os.listdir(data_dir)) == [M.DATASET_NAME]  # no temp folder, no lock file
  again = purge_subjects(data_dir, [GONE])  # nothing left to remove
  assert (again.rows_removed, again.builds_rewritten, again.subjects_found) == (0, 0, 0)


def test_purge_one_build_folder_and_bad_ids(tmp_path):
  root, data_dir = str(tmp_path / 'mimic'), str(tmp_path / 'tfds')
  csv = _tree(root)
  final = M.build_mimic_cxr(csv, root, data_dir, image_size=16)
  s = purge_subjects(final, [12000022])
  assert (s.builds_scanned, s.rows_removed, s.rows_kept) == (1, 1, 4)
  assert 12000022 not in [int(r['subject_id']) for r in _all_records(final)]
  with pytest.raises(ValueError, match='subject_ids entry 1 is not an integer'):
    purge_subjects(final, [1, 'abc'])
  with pytest.raises(FileNotFoundError):
    purge_subjects(str(tmp_path / 'nowhere'), [1])


def test_restrict_permissions(tmp_path):
  top = tmp_path / 'top'
  (top / 'a' / 'b').mkdir(parents=True)
  (top / 'a' / 'f.txt').write_text('x')
  (top / 'g.bin').write_bytes(b'y')
  outside = tmp_path / 'outside.txt'
  outside.write_text('z')
  os.chmod(outside, 0o644)
  os.symlink(outside, top / 'link')
  for p in (top, top / 'a', top / 'a' / 'b'):
    os.chmod(p, 0o755)
  os.chmod(top / 'g.bin', 0o666)
  assert restrict_permissions(top) == 5  # 3 folders, 2 files; the link is skipped
  modes = _modes(str(top))
  assert modes[str(top)] == modes[str(top / 'a' / 'b')] == 0o700
  assert modes[str(top / 'a' / 'f.txt')] == modes[str(top / 'g.bin')] == 0o600
  assert stat.S_IMODE(os.stat(outside).st_mode) == 0o644  # not followed
  assert restrict_permissions(outside) == 1 and stat.S_IMODE(os.stat(outside).st_mode) == 0o600
