"""The Forget-MI step on the real (tiny) model: frozen heads, weights as a traced argument,
cached original outputs equal to the live path, config errors."""
import copy
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from forgetmi_jax.data.pipeline import target_batches
from forgetmi_jax.runs import setup as run_setup
from forgetmi_jax.train import loop
from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
from tests.helpers import ROOT, tiny_config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('step'))
  prep = run_setup.prepare(config)
  return prep, prep.init_variables(0)


def _method(prep, **overrides):
  cfg = copy.deepcopy(prep.config.forgetmi)
  with cfg.unlocked():
    for k, val in overrides.items():
      node = cfg
      *parents, leaf = k.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = val
  return ForgetMIMethod(run_setup.make_context(prep), [loop.Copy(0, cfg)])


def _first_batch(method, original, epoch=0):
  method.prepare(original)
  hp = method.start_epoch(epoch, method.hparams(method.copies[0]))
  batch = next(iter(method.seed_batches(epoch, 0)))
  return method.prepare_batch(batch, epoch, 0), hp


def test_heads_unchanged_encoders_move(setup):
  prep, original = setup
  method = _method(prep)
  state = method.init_state(original, method.copies[0])
  batch, hp = _first_batch(method, original)
  step = jax.jit(method.step)
  for i in range(2):
    state, metrics = step(state, original, batch, method.step_rng(0, 0, i), hp)
  assert np.isfinite(float(metrics['loss']))
  for head in ('image_head', 'text_head', 'joint_head'):
    for a, b in zip(jax.tree.leaves(state.params[head]),
                    jax.tree.leaves(original['params'][head])):
      assert np.array_equal(np.asarray(a), np.asarray(b)), head
  for module in ('image_encoder', 'text_encoder', 'fusion'):
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state.params[module]),
                 jax.tree.leaves(original['params'][module]))]
    assert any(moved), module


def test_weights_change_loss_without_recompiling(setup):
  prep, original = setup
  method = _method(prep)
  state = method.init_state(original, method.copies[0])
  batch, hp = _first_batch(method, original)
  step = jax.jit(method.step)
  losses = []
  for w in ([1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.25, 0.25, 0.25, 0.25]):
    weights = {k: np.float32(v) for k, v in zip(('ur', 'uu', 'mu', 'mr'), w)}
    _, m = step(state, original, batch, method.step_rng(0, 0, 0), dict(hp, loss_weights=weights))
    losses.append(float(m['loss']))
    # the four terms do not depend on the weights; the total is their weighted sum
    np.testing.assert_allclose(m['loss'], np.dot(w, [m['ur'], m['uu'], m['mu'], m['mr']]),
                               rtol=1e-5, atol=1e-6)
  assert losses[0] > 0 > losses[1]  # UR alone >= 0, UU alone <= 0
  assert step._cache_size() == 1


def test_cached_original_equals_live(setup):
  prep, original = setup
  cached = _method(prep, cache_original_outputs=True)
  live = _method(prep, cache_original_outputs=False)
  assert cached.cached and not live.cached
  state = cached.init_state(original, cached.copies[0])
  b_cached, hp = _first_batch(cached, original)
  b_live, hp_live = _first_batch(live, original)
  assert 'targets' in b_cached and 'targets' not in b_live
  _, m_cached = cached.step(state, original, b_cached, cached.step_rng(0, 0, 0), hp)
  _, m_live = live.step(state, original, b_live, live.step_rng(0, 0, 0), hp_live)
  for k in ('loss', 'ur', 'uu', 'mu', 'mr'):
    np.testing.assert_allclose(m_cached[k], m_live[k], rtol=1e-5, atol=1e-6)


def test_retain_targets_only_for_the_retain_images_used(setup):
  """The original's retain embeddings are computed for the images an epoch pairs (its retain
  sample), at their first use, never for the whole retain set; each equals the original's
  own forward on that image, and a later epoch adds its rows without moving earlier ones."""
  prep, original = setup
  method = _method(prep)
  method.prepare(original)
  assert 'retain' not in method.targets
  n_forget = len(prep.split.forget_idx)
  sampler = method.retain_sampler(0)
  for epoch in (0, 1):
    for batch in method.seed_batches(epoch, 0):
      method.prepare_batch(batch, epoch, 0)
    if epoch == 0:
      first = {k: np.array(v) for k, v in method.targets['retain'].items()}
  cache = method.targets['retain']
  used = np.unique(np.concatenate([sampler.epoch(e, n_forget) for e in (0, 1)]))
  assert set(np.flatnonzero(cache['row'] >= 0)) == set(used.tolist())
  assert len(used) < len(prep.split.retain_idx)
  kept = np.flatnonzero(first['row'] >= 0)
  np.testing.assert_array_equal(cache['row'][kept], first['row'][kept])
  np.testing.assert_array_equal(cache['retain_uni'][first['row'][kept]],
                                first['retain_uni'][first['row'][kept]])
  live = method._retain_targets_fn(original, next(iter(target_batches(
      prep.source, used[:8], 8))))
  np.testing.assert_allclose(cache['retain_uni'][cache['row'][used[:8]]], live['retain_uni'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache['retain_joint'][cache['row'][used[:8]]],
                             live['retain_joint'], rtol=1e-5, atol=1e-5)


def test_resampled_noise_changes_targets_by_epoch(setup):
  prep, original = setup
  method = _method(prep, **{'noise.resample_each_epoch': True})
  key = method.target_key(method.copies[0])
  method.prepare(original)
  t0 = np.array(method.targets[key]['forget_uni'])
  method.start_epoch(1, method.hparams(method.copies[0]))
  assert not np.allclose(t0, method.targets[key]['forget_uni'])
  fixed = _method(prep)
  fixed.prepare(original)
  a = np.array(fixed.targets[key]['forget_uni'])
  fixed.start_epoch(1, fixed.hparams(fixed.copies[0]))
  np.testing.assert_array_equal(a, fixed.targets[key]['forget_uni'])


@pytest.mark.parametrize('key,value,message', [
    ('forgetmi.setting', 'bogus', 'forgetmi.setting'),
    ('forgetmi.lr', -1.0, 'forgetmi.lr'),
    ('scrub.lr', 0.0, 'scrub.lr'),
    ('data.source', 'nowhere', 'data.source'),
    ('forgetmi.noise.text_p', 2.0, 'text_p'),
    ('method', 'nope', 'method'),
])
def test_invalid_values_fail_before_training(tmp_path, key, value, message):
  config = tiny_config(tmp_path, **{key: value})
  with pytest.raises(ValueError, match=message):
    run_setup.prepare(config)
  assert not (tmp_path / 'cache').exists() or not any((tmp_path / 'cache').iterdir())


def test_bad_inputs_fail_before_training_with_their_cause(tmp_path):
  empty = tmp_path / 'forget.csv'
  empty.write_text('subject_id\n')
  cases = [({'data.forget_csv': str(empty)}, 'selects no image'),
           ({'forget_fraction': 1e-4}, 'selects no image'),
           ({'train.batch_size': 100000}, 'train.batch_size=100000 is larger'),
           ({'method': 'cf_k', 'cf_k.batch_size': 100000}, 'cf_k.batch_size')]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      run_setup.prepare(tiny_config(tmp_path / 'run', **overrides))
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file
      bad = str(empty / 'sub')
    else:
      bad = str(locked / 'run')
    config = tiny_config(tmp_path / 'run')
    config.workdir = bad
    with pytest.raises(ValueError, match='workdir=.* is not writable'):
      run_setup.prepare(config)
  finally:
    locked.chmod(0o700)
  assert not list((tmp_path / 'run').glob('cache/original-*'))


def test_typo_in_a_config_key_is_named_before_anything_runs():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'unlearn.py'),
                         '--config', os.path.join(ROOT, 'configs', 'forgetmi_10pct.py') + ':smoke',
                         '--config.forgetmi.lrr=1'], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode != 0
  assert "unknown config key 'forgetmi.lrr' (did you mean forgetmi.lr?)" in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'unlearn.py'),
                         '--config', os.path.join(ROOT, 'configs', 'forgetmi_10pct.py') + ':smoke',
                         '--config.forgetmi.lr=abc'], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode != 0 and 'forgetmi.lr' in proc.stderr and 'Traceback' not in proc.stderr
