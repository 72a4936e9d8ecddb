"""The forget-request command end to end on the tiny config: a request of 3 patients against
the cached original, outputs (orbax + safetensors + public-code state dict, report, plot),
the weight hashes, TensorBoard events, and an original given as a file."""
import json
import os

import jax
import numpy as np
import pytest

from configs import forget_request as request_config
from forgetmi_jax.evaluation.forget_report import sha256_of_variables
from forgetmi_jax.runs import forget_request, setup
from forgetmi_jax.train.checkpoints import load_variables_safetensors, save_variables_safetensors
from forgetmi_jax.train.tensorboard import read_scalars
from tests.helpers import tiny_config


def _config(tmp_path, **overrides):
  c = request_config.get_config('smoke')
  base = tiny_config(tmp_path / 'run', **overrides)
  with c.unlocked():
    c.data, c.train, c.forgetmi = base.data, base.train, base.forgetmi
    c.data.val_fraction = 0.0  # a request's original saw every non-TEST patient
    c.workdir, c.cache_dir = base.workdir, base.cache_dir
    c.request.export_reference = False
  return c


@pytest.fixture(scope='module')
def done(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('forget')
  config = _config(tmp)
  prep = setup.prepare(_config(tmp))
  subjects = np.unique(prep.cohort.subject_id[prep.cohort.fold != 'TEST'])[:3]
  csv = tmp / 'request.csv'
  csv.write_text('subject_id\n' + ''.join(f'{s}\n' for s in subjects) + f'{subjects[0]}\n')
  with config.unlocked():
    config.request.subjects_csv = str(csv)
  payload = forget_request.run(config)
  return tmp, prep, subjects, payload


def test_outputs_and_report(done):
  tmp, prep, subjects, payload = done
  workdir = tmp / 'run'
  report = json.loads((workdir / 'forget_report.json').read_text())
  for key in ('n_subjects', 'n_studies', 'n_images', 'sha256_original', 'sha256_unlearned',
              'seconds', 'per_patient'):
    assert key in report, key
  assert report['n_subjects'] == 3
  n_images = int(np.isin(prep.cohort.subject_id, subjects).sum())
  assert report['n_images'] == n_images
  assert sorted(p['subject_id'] for p in report['per_patient']) == sorted(subjects.tolist())
  assert (workdir / 'forget_report.md').exists() and (workdir / 'forget_exposure.png').exists()
  unlearned = load_variables_safetensors(str(workdir / 'unlearned' / 'model.safetensors'))
  assert sha256_of_variables(unlearned) == report['sha256_unlearned']
  assert report['sha256_unlearned'] != report['sha256_original']
  (original,), _ = setup.train_or_load(prep, 'original', allow_training=False)
  assert sha256_of_variables(original) == report['sha256_original']
  # only what unlearning trains changed: the heads are bit-identical
  for head in ('image_head', 'text_head', 'joint_head'):
    assert sha256_of_variables({'params': unlearned['params'][head]}) == sha256_of_variables(
        {'params': jax.device_get(original['params'][head])})
  assert payload['original_from'] == 'cache'


def test_tensorboard_events_of_the_run(done):
  tmp = done[0]
  tags = set()
  for root, _, files in os.walk(tmp / 'run' / 'tensorboard'):
    if any(f.startswith('events') for f in files):
      tags |= set(read_scalars(root))
  name = request_config.get_config().method  # the paper's Forget-MI for a request
  assert name == 'forgetmi_paper'
  for tag in (f'{name}/loss', f'{name}/ur', f'{name}/uu', f'{name}/mu', f'{name}/mr',
              f'{name}/lr', f'{name}/examples_per_s', 'train/loss', 'train/lr'):
    assert tag in tags, (tag, sorted(tags))


def test_an_original_from_a_file_and_bad_requests(done, tmp_path):
  tmp, prep, subjects, _ = done
  (original,), _ = setup.train_or_load(prep, 'original', allow_training=False)
  path = tmp_path / 'original.safetensors'
  save_variables_safetensors(str(path), original)
  loaded = forget_request.load_original(str(path), prep.config, prep.init_variables(0))
  assert sha256_of_variables(loaded) == sha256_of_variables(original)
  test_subject = int(prep.cohort.subject_id[prep.cohort.fold == 'TEST'][0])
  bad = tmp_path / 'bad.csv'
  bad.write_text(f'subject_id\n{test_subject}\n999999999\n')
  config = _config(tmp)
  with config.unlocked():
    config.request.subjects_csv = str(bad)
    config.workdir = str(tmp_path / 'bad_run')
  with pytest.raises(ValueError, match='999999999') as err:
    forget_request.run(config)
  assert str(test_subject) in str(err.value) and str(bad) in str(err.value)
  assert not (tmp_path / 'bad_run' / 'checkpoints').exists()
