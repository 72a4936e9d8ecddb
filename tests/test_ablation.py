"""The ablation grid: grid expansion, chunk planning and ranking in isolation; then, on the smoke
config, the vmapped runner against the sequential one (same params and losses per setting),
and the whole grid command (outputs, memory-based chunking, resumption)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import ablation_10pct
from configs.base import LOSS_WEIGHT_PRESETS
from forgetmi_jax import ablation, pipeline
from forgetmi_jax.train.state import make_optimizer
from forgetmi_jax.unlearning import grid

LOSSES = ('loss', 'ur', 'uu', 'mu', 'mr')


def _ab(**kw):
  c = ablation_10pct.get_config().ablation
  with c.unlocked():
    for k, v in kw.items():
      c[k] = v
  return c


# ------------------------------------------------------------------------------ pure pieces
def test_expand_grid_default_and_no_noise_collapses():
  settings = grid.expand_grid(_ab())
  assert len(settings) == 4 * 3 * 2 + 2  # no_noise ignores the noise grid
  ids = [s.setting_id for s in settings]
  assert len(set(ids)) == len(ids)
  assert all(all(ch.isalnum() or ch in '._-' for ch in i) for i in ids)
  nn = [s for s in settings if s.name == 'no_noise']
  assert len(nn) == 2 and all(s.noise_key == ('clean',) and s.mu is None for s in nn)
  eq = [s for s in settings if s.name == 'equal']
  assert {s.noise_key for s in eq} == {(0.0, 0.05), (0.0, 0.1), (0.1, 0.1)}
  assert {s.lr for s in eq} == {1e-4, 1e-5}
  m = next(s for s in settings if s.name == 'multimodal')
  assert m.weights == tuple(LOSS_WEIGHT_PRESETS['multimodal'][k] for k in grid.LOSS_KEYS)
  cfg = m.method_config(ablation_10pct.get_config().unlearn)
  assert cfg.setting == 'multimodal' and cfg.lr == m.lr and cfg.noise.image_sigma == m.sigma
  assert cfg.loss_weights.mu == 2.0


def test_expand_grid_rejects_bad_values():
  with pytest.raises(ValueError, match='unknown'):
    grid.expand_grid(_ab(settings=('equal', 'nope')))
  with pytest.raises(ValueError, match='lrs'):
    grid.expand_grid(_ab(lrs=(0.0,)))
  with pytest.raises(ValueError, match='noise'):
    grid.expand_grid(_ab(noise=((0.0, -0.1),)))
  with pytest.raises(ValueError, match='duplicate'):
    grid.expand_grid(_ab(lrs=(1e-4, 1e-4)))


def test_plan_chunks_fits_the_budget_in_equal_chunks():
  mib = 2 ** 20
  sizes = grid.plan_chunks(26, per_copy_bytes=100 * mib, fixed_bytes=50 * mib,
                           budget_bytes=1050 * mib)  # 10 copies fit
  assert sizes == [9, 9, 8] and sum(sizes) == 26
  assert max(sizes) * 100 * mib + 50 * mib <= 1050 * mib
  assert grid.plan_chunks(5, 100, 0, 10) == [1] * 5  # one copy over budget still runs, alone
  assert grid.plan_chunks(5, 1, 0, 1e9) == [5]
  assert grid.plan_chunks(7, chunk_size=3) == [3, 2, 2]
  assert grid.plan_chunks(0) == []


def test_rank_rows_gap_then_mia_missing_last():
  rows = [{'setting_id': 'a', 'avg_gap': 0.2, 'mia': 0.1},
          {'setting_id': 'b', 'avg_gap': 0.1, 'mia': 0.9},
          {'setting_id': 'c', 'avg_gap': 0.1, 'mia': 0.5},
          {'setting_id': 'd', 'avg_gap': None, 'mia': 0.0},
          {'setting_id': 'e', 'avg_gap': float('nan'), 'mia': 0.0}]
  assert [r['setting_id'] for r in ablation.rank_rows(rows)] == ['c', 'b', 'a', 'd', 'e']
  assert ablation.select_best(rows)['setting_id'] == 'c'
  assert ablation.select_best([]) is None


def test_with_learning_rate_changes_every_injected_rate():
  params = {'enc': {'kernel': jnp.ones((2, 2))}, 'image_head': {'kernel': jnp.ones(2)}}
  state = make_optimizer(params, 1e-4, frozen=('image_head',)).init(params)
  assert grid.learning_rates(state) == pytest.approx([1e-4])
  assert grid.learning_rates(grid.with_learning_rate(state, 3e-6)) == pytest.approx([3e-6])
  stacked = grid.stack([grid.with_learning_rate(state, lr) for lr in (1e-4, 1e-5)])
  assert grid.learning_rates(stacked) == pytest.approx([1e-4, 1e-5])  # one rate per copy
  np.testing.assert_allclose(jax.tree.leaves(stacked[0].hyperparams['learning_rate']),
                             [[1e-4, 1e-5]], rtol=1e-6)


# ------------------------------------------------------------------------------ smoke runs
@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp('ablation')
  config = ablation_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'run')
    config.cache_dir = str(root / 'cache')
  return root, config


@pytest.fixture(scope='module')
def prepared(smoke):
  root, config = smoke
  import copy
  config = copy.deepcopy(config)
  with config.unlocked():
    config.workdir = str(root / 'equivalence')
  prep = pipeline.prepare(config, 'ablation_smoke')
  non_test = np.sort(np.concatenate([prep.split.forget_idx, prep.split.retain_idx]))
  original, _ = pipeline.train_or_load(prep, 'original', non_test)
  return prep, original


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_vmapped_grid_matches_sequential_runs(prepared, tmp_path):
  """Three settings with three distinct targets (clean, two noises), two lrs, different
  weights, in chunks of 2 (the second padded): each copy ends where its own run ends."""
  prep, original = prepared
  settings = [grid.Setting('no_noise', (1.0, 1.0, 1.0, 1.0), None, None, 1e-4, 0),
              grid.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.1, 0.05, 1e-5, 0),
              grid.Setting('retention', (2.0, 1.0, 1.0, 2.0), 0.0, 0.1, 1e-4, 0)]
  ab = _ab(chunk_size=2)
  units = list(ablation.train_grid(prep, original, settings, 'vmap', ab))
  assert [len(u[0]) for u in units] == [2, 1]
  assert all(u[4]['chunk']['padded_to'] == 2 for u in units)
  v_states = [s for u in units for s in u[1]]
  v_hist = [h for u in units for h in u[3]]
  seq = list(ablation.train_grid(prep, original, settings, 'sequential',
                                 ckpt_root=str(tmp_path / 'ckpt')))
  s_states = [u[1][0] for u in seq]
  s_hist = [u[3][0] for u in seq]
  epochs = int(prep.config.unlearn.epochs)
  moved = []
  for setting, v, s, hv, hs in zip(settings, v_states, s_states, v_hist, s_hist):
    assert len(hv) == len(hs) == epochs
    for ev, es in zip(hv, hs):
      for k in LOSSES:
        assert ev[k] == pytest.approx(es[k], rel=1e-4, abs=1e-6), (setting.setting_id, k)
    for a, b in zip(jax.tree.leaves(v.params), jax.tree.leaves(s.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        v.batch_stats)]), np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.batch_stats)]),
        rtol=1e-4, atol=1e-5)
    assert int(v.step) == int(s.step) > 0
    # The heads are frozen: bit-identical to the original in both modes.
    for head in ('image_head', 'text_head', 'joint_head'):
      assert _max_abs_diff(v.params[head], original.params[head]) == 0.0
    moved.append(_max_abs_diff(v.params, original.params))
  # Each copy trained at its own lr (AdamW moves ~lr per step): 1e-5 moves ~10x less.
  assert moved[1] < 0.3 * min(moved[0], moved[2])
  # Different settings really differ (the copies are not one run repeated).
  assert abs(v_hist[0][-1]['loss'] - v_hist[2][-1]['loss']) > 1e-3


def test_ablation_command_outputs_chunking_and_resume(smoke, monkeypatch):
  root, config = smoke
  import copy
  config = copy.deepcopy(config)
  with config.unlocked():
    config.ablation.settings = ('no_noise', 'equal')
    config.ablation.noise = ((0.0, 0.1),)
    config.ablation.lrs = (1e-4,)
    config.ablation.seeds = (0, 1)
  payload = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  workdir = config.workdir
  with open(os.path.join(workdir, 'ablation.json')) as f:
    saved = json.load(f)
  rows = saved['rows']
  assert [r['setting_id'] for r in rows] == [
      'no_noise_clean_lr0.0001_seed0', 'no_noise_clean_lr0.0001_seed1',
      'equal_mu0_sigma0.1_lr0.0001_seed0', 'equal_mu0_sigma0.1_lr0.0001_seed1']
  for r in rows:
    for k in ('mia', 'forget_auc', 'forget_f1', 'test_auc', 'test_f1', 'distance_to_retrain',
              'seconds', 'avg_gap', 'gap_mia', 'weights', 'noise', 'lr', 'seed', 'setting'):
      assert k in r, (r['setting_id'], k)
    assert 0 <= r['forget_auc'] <= 1 and r['seconds'] > 0 and r['mode'] == 'vmap'
    assert os.path.exists(os.path.join(workdir, 'rows', f"{r['setting_id']}.json"))
  assert saved['best']['setting_id'] == ablation.rank_rows(rows)[0]['setting_id']
  assert saved['best']['avg_gap'] == min(r['avg_gap'] for r in rows)
  # The seed changes the run (data order, retain sample, dropout): seed groups differ.
  assert rows[0]['final_losses']['loss'] != pytest.approx(rows[1]['final_losses']['loss'],
                                                          rel=1e-6)
  # Two seed groups of 2, sized from the measured memory (one program, two runs).
  plan = saved['chunking'][0]
  assert plan['per_copy_bytes'] > 0 and plan['fixed_bytes'] >= 0
  assert plan['chunk_sizes'] == [2]
  assert set(saved['models']) == {'original', 'retrain'}
  assert saved['paper']['table2'] is None and set(saved['paper']['table1']) == {'retrain',
                                                                                 'forgetmi'}
  with open(os.path.join(workdir, 'ablation.md')) as f:
    md = f.read()
  assert 'Table 2' in md and 'not transcribed' in md and 'Forget-MI' in md
  assert f"**Best: `{saved['best']['setting_id']}`**" in md
  assert md.count('| no_noise |') == 2 and md.count('| equal |') == 2

  # Resume with everything done: nothing is trained, the rows come back unchanged.
  calls = []
  real_train_grid = ablation.train_grid

  def spy(prep, original, settings, *a, **kw):
    calls.append([s.setting_id for s in settings])
    return real_train_grid(prep, original, settings, *a, **kw)
  monkeypatch.setattr(ablation, 'train_grid', spy)
  again = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  assert calls == [[]]
  assert again['rows'] == payload['rows']

  # Lose one finished row: only that setting runs again, here in the sequential mode, and it
  # reproduces the vmapped row (metrics from the same trajectory, to float rounding).
  lost = 'equal_mu0_sigma0.1_lr0.0001_seed1'
  os.remove(os.path.join(workdir, 'rows', f'{lost}.json'))
  with config.unlocked():
    config.ablation.mode = 'sequential'
  calls.clear()
  third = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  assert calls == [[lost]]
  old = {r['setting_id']: r for r in payload['rows']}[lost]
  new = {r['setting_id']: r for r in third['rows']}[lost]
  assert new['mode'] == 'sequential'
  for k in LOSSES:
    assert new['final_losses'][k] == pytest.approx(old['final_losses'][k], rel=1e-4, abs=1e-6)
  for k in ('forget_auc', 'test_auc', 'distance_to_retrain'):
    assert new[k] == pytest.approx(old[k], abs=1e-3), k
  ckpt = os.path.join(workdir, 'checkpoints')  # sequential checkpoints go once the row is saved
  assert not os.path.exists(ckpt) or not os.listdir(ckpt)
