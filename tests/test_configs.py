"""Every shipped config file builds, resolves and validates (plain and :smoke), and the one
that once crashed at its first step (the public code's quirks, REFERENCE 8.1-8.4, 8.7) runs."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from forgetmi_jax import config as config_lib
from forgetmi_jax.runs import setup
from forgetmi_jax.unlearning import registry
from tests.helpers import ROOT, tiny_config

SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py',))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', SHIPPED, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_shipped_config_is_valid(path, arg):
  c = load(path, arg)
  config_lib.resolve(c)
  assert c.method in registry.names()
  assert set(registry.names()) >= {'forgetmi', 'forgetmi_paper', 'neggrad_plus', 'scrub', 'cf_k',
                                   'eu_k', 'multidelete'}
  if arg == 'smoke':
    assert c.data.synthetic.num_subjects == 80


def test_reference_config_runs_its_first_epochs(tmp_path):
  """configs/forgetmi_reference.py: fresh gates in the step, train-mode original, epoch
  accumulation (no step in epoch 0), retention cap; finite losses, and a step in epoch 1."""
  c = load(os.path.join(ROOT, 'configs', 'forgetmi_reference.py'), 'smoke')
  base = tiny_config(tmp_path)
  with c.unlocked():
    c.data, c.train, c.workdir, c.cache_dir = base.data, base.train, base.workdir, base.cache_dir
    c.forgetmi.epochs = 2
  prep = setup.prepare(c)
  original = prep.init_variables(0)
  result = setup.run_method(prep, original)
  hist = result.histories[0]
  assert [h['epoch'] for h in hist] == [0, 1]
  assert all(np.isfinite(h['loss']) for h in hist)
  state = result.states[0]
  assert int(state.step) == 1  # REFERENCE 8.2: epoch 0 makes no step, epoch 1 makes one
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(state.params['image_encoder']),
      jax.tree.leaves(original['params']['image_encoder'])))
  assert moved > 0


def test_typo_in_config_arg_names_it():
  with pytest.raises(ValueError, match="unknown config argument 'smoek'"):
    load(os.path.join(ROOT, 'configs', 'unlearn.py'), 'smoek')


def test_a_bad_budget_is_named_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r'forgetmi\.budget=-0\.1 must be >= 0'):
    config_lib.validate(tiny_config(tmp_path, **{'forgetmi.budget': -0.1}))
  with pytest.raises(ValueError, match=r'forgetmi\.repair\.budget_share=1\.0 must be in'):
    config_lib.validate(tiny_config(tmp_path, **{'forgetmi.repair.budget_share': 1.0}))
  config_lib.resolve(tiny_config(tmp_path, **{'forgetmi.budget': 0.1}))
  with pytest.raises(ValueError, match=r'forgetmi\.project_conflicts=1\.5 must be in \[0, 1\]'):
    config_lib.validate(tiny_config(tmp_path, **{'forgetmi.project_conflicts': 1.5}))
  with pytest.raises(ValueError, match=r'forgetmi\.trunk\.k_image=2 and forgetmi\.trunk\.k_text=-1'):
    config_lib.validate(tiny_config(tmp_path, **{'forgetmi.trunk.k_image': 2}))
  config_lib.resolve(tiny_config(tmp_path, **{'forgetmi.trunk.k_image': 2,
                                              'forgetmi.trunk.k_text': 1}))


def test_a_negative_checkpoint_interval_is_named(tmp_path):
  with pytest.raises(ValueError, match=r'checkpoint_every_s=-1\.0 must be >= 0'):
    config_lib.resolve(tiny_config(tmp_path, checkpoint_every_s=-1.0))
  config_lib.resolve(tiny_config(tmp_path, checkpoint_every_s=0.0))
