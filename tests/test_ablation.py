"""The ablation grid: grid expansion, chunk planning, learning rates, ranking and row
fingerprints in isolation; then, on the smoke config, the vmapped grid (N stacked copies on the
loop) against N sequential one-copy runs (same params and losses per setting), and the whole
grid command (outputs, memory-based chunking, resumption, stale rows recomputed)."""
import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ablation as ablation_config
from forgetmi_jax.config import LOSS_WEIGHT_PRESETS
from forgetmi_jax.runs import ablation, setup
from forgetmi_jax.train import loop, optim
from forgetmi_jax.unlearning.forgetmi import TERMS

LOSSES = ('loss', 'ur', 'uu', 'mu', 'mr')


def _ab(**kw):
  c = ablation_config.get_config('pct=10').ablation
  with c.unlocked():
    for k, v in kw.items():
      c[k] = v
  return c


# ------------------------------------------------------------------------------ pure pieces
def test_expand_grid_default_and_no_noise_collapses():
  settings = ablation.expand_grid(_ab())
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
  assert m.weights == tuple(LOSS_WEIGHT_PRESETS['multimodal'][k] for k in TERMS)
  base = ablation_config.get_config('pct=10').forgetmi
  before = base.to_dict()
  cfg = m.method_config(base)
  assert cfg.setting == 'multimodal' and cfg.lr == m.lr and cfg.noise.image_sigma == m.sigma
  assert cfg.loss_weights.mu == 2.0
  # A deep copy: the base group is untouched, and the copy carries the seed and the id.
  assert base.to_dict() == before
  c = m.copy(base)
  assert isinstance(c, loop.Copy) and c.seed == m.seed and c.name == m.setting_id
  assert c.cfg.to_dict() == cfg.to_dict()


def test_expand_grid_rejects_bad_values():
  with pytest.raises(ValueError, match='unknown'):
    ablation.expand_grid(_ab(settings=('equal', 'nope')))
  with pytest.raises(ValueError, match='lrs'):
    ablation.expand_grid(_ab(lrs=(0.0,)))
  with pytest.raises(ValueError, match='noise'):
    ablation.expand_grid(_ab(noise=((0.0, -0.1),)))
  with pytest.raises(ValueError, match='duplicate'):
    ablation.expand_grid(_ab(lrs=(1e-4, 1e-4)))


def test_plan_chunks_fits_the_budget_in_equal_chunks():
  mib = 2 ** 20
  sizes = loop.plan_chunks(26, per_copy_bytes=100 * mib, fixed_bytes=50 * mib,
                           budget_bytes=1050 * mib)  # 10 copies fit
  assert sizes == [9, 9, 8] and sum(sizes) == 26
  assert max(sizes) * 100 * mib + 50 * mib <= 1050 * mib
  assert loop.plan_chunks(5, 100, 0, 10) == [1] * 5  # one copy over budget still runs, alone
  assert loop.plan_chunks(5, 1, 0, 1e9) == [5]
  assert loop.plan_chunks(7, chunk_size=3) == [3, 2, 2]
  assert loop.plan_chunks(0) == []


def test_rank_rows_gap_then_mia_missing_last():
  rows = [{'setting_id': 'a', 'avg_gap': 0.2, 'mia': 0.1},
          {'setting_id': 'b', 'avg_gap': 0.1, 'mia': 0.9},
          {'setting_id': 'c', 'avg_gap': 0.1, 'mia': 0.5},
          {'setting_id': 'd', 'avg_gap': None, 'mia': 0.0},
          {'setting_id': 'e', 'avg_gap': float('nan'), 'mia': 0.0}]
  assert [r['setting_id'] for r in ablation.rank_rows(rows)] == ['c', 'b', 'a', 'd', 'e']
  assert ablation.select_best(rows)['setting_id'] == 'c'
  assert ablation.select_best([]) is None


def test_set_learning_rate_changes_every_injected_rate():
  params = {'enc': {'kernel': jnp.ones((2, 2))}, 'image_head': {'kernel': jnp.ones(2)}}
  tx = optim.adamw(1e-4, frozen_mask=optim.prefix_mask(params, ('image_head',)))
  state = tx.init(params)
  # optax 0.2 keeps injected hyperparameters in an InjectStatefulHyperparamsState.
  assert any(isinstance(s, optax.InjectStatefulHyperparamsState) for s in state)
  assert optim.learning_rates(state) == pytest.approx([1e-4])
  assert optim.learning_rates(optim.set_learning_rate(state, 3e-6)) == pytest.approx([3e-6])
  stacked = loop.stack([optim.set_learning_rate(state, lr) for lr in (1e-4, 1e-5)])
  assert optim.learning_rates(stacked) == pytest.approx([1e-4, 1e-5])  # one rate per copy
  np.testing.assert_allclose(jax.tree_util.tree_leaves(stacked[0].hyperparams['learning_rate']),
                             [[1e-4, 1e-5]], rtol=1e-6)
  with pytest.raises(ValueError, match='no injected learning rate'):
    optim.set_learning_rate(optax.adam(1e-3).init(params), 1e-4)  # never silently ignored


# ------------------------------------------------------------------------------ smoke runs
@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp('ablation')
  config = ablation_config.get_config('pct=10,smoke')
  with config.unlocked():
    config.workdir = str(root / 'run')
    config.cache_dir = str(root / 'cache')
  return root, config


@pytest.fixture(scope='module')
def prepared(smoke):
  root, config = smoke
  config = copy.deepcopy(config)
  with config.unlocked():
    config.workdir = str(root / 'equivalence')
  prep = setup.prepare(config, 'ablation_smoke')
  (original,), _ = setup.train_or_load(prep, 'original')
  return prep, original


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_row_fingerprint_is_the_setting_and_its_run(prepared, tmp_path):
  """A row's key changes with anything that changes its result, and a row saved under another
  key is not reused."""
  prep, _ = prepared
  a = ablation.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.0, 0.1, 1e-4, 0)
  key = ablation.row_key(prep, a)
  assert ablation.row_key(prep, a) == key  # stable
  others = [ablation.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.0, 0.1, 1e-5, 0),
            ablation.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.0, 0.05, 1e-4, 0),
            ablation.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.0, 0.1, 1e-4, 1),
            ablation.Setting('retention', (2.0, 1.0, 1.0, 2.0), 0.0, 0.1, 1e-4, 0)]
  assert len({key} | {ablation.row_key(prep, s) for s in others}) == 5
  run_key, what = setup.run_fingerprint(prep, 'forgetmi', [a.copy(prep.config.forgetmi)])
  assert what['copies'][0][1]['lr'] == 1e-4 and what['copies'][0][0] == 0
  changed = dataclasses.replace(prep, config=copy.deepcopy(prep.config))
  with changed.config.unlocked():
    changed.config.eval.mia_seed = 7  # another evaluation: another row
  assert ablation.row_key(changed, a) != key
  with changed.config.unlocked():
    changed.config.eval.mia_seed = prep.config.eval.mia_seed
    changed.config.forgetmi.weight_decay = 0.5  # another method config: another run and row
  assert ablation.row_key(changed, a) != key
  assert setup.run_fingerprint(changed, 'forgetmi', [a.copy(changed.config.forgetmi)])[0] != run_key
  # load_rows: the matching row comes back; one saved under another key does not.
  b = others[0]
  row = {'setting_id': a.setting_id, 'mia': 0.5}
  ablation.save_row(str(tmp_path), key, row)
  ablation.save_row(str(tmp_path), 'stale-fingerprint', {'setting_id': b.setting_id, 'mia': 0.1})
  loaded = ablation.load_rows(str(tmp_path), {a.setting_id: key,
                                              b.setting_id: ablation.row_key(prep, b)})
  assert loaded == {a.setting_id: row}


def test_vmapped_grid_matches_sequential_runs(prepared, tmp_path):
  """Three settings with three distinct targets (clean, two noises), two lrs, different
  weights, stacked on the loop in chunks of 2 (the second padded): each copy ends where its
  own one-copy run ends (N stacked copies == N sequential runs)."""
  prep, original = prepared
  settings = [ablation.Setting('no_noise', (1.0, 1.0, 1.0, 1.0), None, None, 1e-4, 0),
              ablation.Setting('equal', (1.0, 1.0, 1.0, 1.0), 0.1, 0.05, 1e-5, 0),
              ablation.Setting('retention', (2.0, 1.0, 1.0, 2.0), 0.0, 0.1, 1e-4, 0)]
  ab = _ab(chunk_size=2)
  units = list(ablation.train_grid(prep, original, settings, 'vmap', ab,
                                   ckpt_root=str(tmp_path / 'vmap')))
  assert len(units) == 1  # one loop run for the whole grid
  unit = units[0]
  assert [s.setting_id for s in unit.settings] == [s.setting_id for s in settings]
  assert unit.groups == [[0, 1], [2]]
  assert [e['chunk']['index'] for e in unit.extras] == [0, 0, 1]
  assert all(e['chunk']['padded_to'] == 2 for e in unit.extras)
  assert unit.extras[0]['chunk_plan']['chunk_sizes'] == [2, 1]
  # The loop really ran two chunks (its per-chunk checkpoint folders).
  assert sorted(d for d in os.listdir(unit.ckpt_dir) if d.startswith('chunk')) == [
      'chunk0-of-2', 'chunk1-of-2']
  v_states, v_hist = unit.states, unit.histories
  seq = list(ablation.train_grid(prep, original, settings, 'sequential',
                                 ckpt_root=str(tmp_path / 'ckpt')))
  assert len(seq) == 3 and all(len(u.settings) == 1 for u in seq)
  s_states = [u.states[0] for u in seq]
  s_hist = [u.histories[0] for u in seq]
  epochs = int(prep.config.forgetmi.epochs)
  moved = []
  for setting, v, s, hv, hs in zip(settings, v_states, s_states, v_hist, s_hist):
    assert len(hv) == len(hs) == epochs
    for ev, es in zip(hv, hs):
      for k in LOSSES:
        assert ev[k] == pytest.approx(es[k], rel=1e-4, abs=1e-6), (setting.setting_id, k)
    # to float rounding: the L2 distance is under 1 % of how far the copy moved (measured
    # 0.16 %; a max-abs bound fails under Adam, which turns rounding in near-zero gradients
    # into lr-sized steps; a copy fed another copy's batches or targets lands 20-100 % away)
    leaves = jax.tree_util.tree_leaves
    diff = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b)) ** 2)
                       for a, b in zip(leaves(v.params), leaves(s.params))))
    move = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b)) ** 2) for a, b in
                       zip(jax.tree_util.tree_leaves(s.params),
                           jax.tree_util.tree_leaves(original['params']))))
    assert diff <= 1e-2 * move, (setting.setting_id, diff, move)
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
        v.batch_stats)]), np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
            s.batch_stats)]), rtol=1e-4, atol=5e-5)  # BN means: 1.8e-5 measured
    assert int(v.step) == int(s.step) > 0
    # Each copy carries its own learning rate in its optimiser state.
    assert optim.learning_rates(v.opt_state) == pytest.approx([setting.lr])
    # The heads are frozen: bit-identical to the original in both modes.
    for head in ('image_head', 'text_head', 'joint_head'):
      assert _max_abs_diff(v.params[head], original['params'][head]) == 0.0
    moved.append(_max_abs_diff(v.params, original['params']))
  # Each copy trained at its own lr (AdamW moves ~lr per step): 1e-5 moves ~10x less.
  assert moved[1] < 0.3 * min(moved[0], moved[2])
  # Different settings really differ (the copies are not one run repeated).
  assert abs(v_hist[0][-1]['loss'] - v_hist[2][-1]['loss']) > 1e-3


def test_ablation_command_outputs_chunking_and_resume(smoke, monkeypatch):
  root, config = smoke
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
              'seconds', 'avg_gap', 'gap_mia', 'weights', 'noise', 'lr', 'seed', 'setting',
              'fingerprint', 'run_fingerprint'):
      assert k in r, (r['setting_id'], k)
    assert 0 <= r['forget_auc'] <= 1 and r['seconds'] > 0 and r['mode'] == 'vmap'
    path = os.path.join(workdir, 'rows', f"{r['setting_id']}.json")
    with open(path) as f:
      assert json.load(f)['key'] == r['fingerprint']
  assert saved['best']['setting_id'] == ablation.rank_rows(rows)[0]['setting_id']
  assert saved['best']['avg_gap'] == min(r['avg_gap'] for r in rows)
  # The seed changes the run (data order, retain sample, dropout): the copies differ.
  assert rows[0]['final_losses']['loss'] != pytest.approx(rows[1]['final_losses']['loss'],
                                                          rel=1e-6)
  # Four copies (two seeds, per-copy batches) in one program, sized from the measured memory.
  plan = saved['chunking'][0]
  assert plan['per_copy_bytes'] > 0 and plan['fixed_bytes'] >= 0
  assert plan['chunk_sizes'] == [4]
  assert 4 * plan['per_copy_bytes'] + plan['fixed_bytes'] <= plan['memory_budget_gb'] * 2 ** 30
  assert len({r['run_fingerprint'] for r in rows}) == 1  # one loop run made them all
  assert set(saved['models']) == {'original', 'retrain'}
  assert saved['paper']['table2'] is None and set(saved['paper']['table1']) == {'retrain',
                                                                                 'forgetmi'}
  with open(os.path.join(workdir, 'ablation.md')) as f:
    md = f.read()
  assert 'Table 2' in md and 'not transcribed' in md and 'Forget-MI' in md
  assert f"**Best: `{saved['best']['setting_id']}`**" in md
  assert md.count('| no_noise |') == 2 and md.count('| equal |') == 2
  ckpt = os.path.join(workdir, 'checkpoints')  # checkpoints go once the rows are saved
  assert not os.path.exists(ckpt) or not os.listdir(ckpt)

  # Resume with everything done: nothing is trained, the rows come back unchanged.
  calls, runs = [], []
  real_train_grid, real_run_method = ablation.train_grid, setup.run_method

  def spy(prep, original, settings, *a, **kw):
    calls.append([s.setting_id for s in settings])
    return real_train_grid(prep, original, settings, *a, **kw)

  def run_spy(*a, **kw):
    runs.append(len(kw['copies']))
    return real_run_method(*a, **kw)
  monkeypatch.setattr(ablation, 'train_grid', spy)
  monkeypatch.setattr(setup, 'run_method', run_spy)
  again = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  assert calls == [[]] and runs == []
  assert again['rows'] == payload['rows']

  # Lose two finished rows (one per seed: the copies with per-copy batches): only those settings
  # run again, here in the sequential mode (one one-copy run each), and they reproduce the
  # vmapped rows (the same trajectory, to float rounding: each copy got its own seed's batches
  # and frozen-original targets).
  lost = ['equal_mu0_sigma0.1_lr0.0001_seed0', 'equal_mu0_sigma0.1_lr0.0001_seed1']
  for sid in lost:
    os.remove(os.path.join(workdir, 'rows', f'{sid}.json'))
  with config.unlocked():
    config.ablation.mode = 'sequential'
  calls.clear()
  third = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  assert calls == [lost] and runs == [1, 1]
  for sid in lost:
    old = {r['setting_id']: r for r in payload['rows']}[sid]
    new = {r['setting_id']: r for r in third['rows']}[sid]
    assert new['mode'] == 'sequential'
    assert new['fingerprint'] == old['fingerprint']  # the mode is not part of what made it
    for k in LOSSES:
      assert new['final_losses'][k] == pytest.approx(old['final_losses'][k], rel=1e-4,
                                                     abs=1e-6), (sid, k)
    for k in ('forget_auc', 'test_auc', 'distance_to_retrain'):
      assert new[k] == pytest.approx(old[k], abs=1e-3), (sid, k)
  assert not os.path.exists(ckpt) or not os.listdir(ckpt)

  # A row whose fingerprint differs (made by another config) is not reused: recomputed.
  stale = 'no_noise_clean_lr0.0001_seed0'
  path = os.path.join(workdir, 'rows', f'{stale}.json')
  with open(path) as f:
    doc = json.load(f)
  doc['key'] = 'another-config'
  doc['row']['mia'] = -1.0  # a value no real run gives: must not come back
  with open(path, 'w') as f:
    json.dump(doc, f)
  calls.clear()
  runs.clear()
  fourth = ablation.run_ablation(copy.deepcopy(config), 'ablation_smoke')
  assert calls == [[stale]] and runs == [1]
  redone = {r['setting_id']: r for r in fourth['rows']}[stale]
  first = {r['setting_id']: r for r in payload['rows']}[stale]
  assert redone['mia'] != -1.0 and redone['fingerprint'] == first['fingerprint']
  assert redone['forget_auc'] == pytest.approx(first['forget_auc'], abs=1e-3)
  with open(path) as f:
    assert json.load(f)['key'] == first['fingerprint']
