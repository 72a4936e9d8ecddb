"""Forget-MI+'s repair phase: its loss against a numpy computation, the pushed logits it anchors
to, and the two-phase run (push, then repair from each copy's pushed model, one stopping rule)."""
import copy
import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache

from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.runs import setup
from forgetmi_jax.unlearning import repair
from forgetmi_jax.train import loop
from tests.helpers import tiny_config


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('repair'), **{
      'forgetmi.repair.epochs': 2, 'forgetmi.repair.retain_examples': 16})
  return setup.prepare(config)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_is_retain_ce_plus_anchored_forget_kl(prep):
  variables = prep.init_variables(0)
  source, split = prep.source, prep.split
  forget = source.get_batch(np.asarray(split.forget_idx[:3]), pad_to=4)  # one padded row
  retain = source.get_batch(np.asarray(split.retain_idx[:4]))
  rng = jax.random.PRNGKey(3)
  pushed = np.random.default_rng(0).normal(size=(4, 3, 4)).astype(np.float32)
  hp = {'anchor': jnp.float32(0.5), 'temperature': jnp.float32(2.0)}
  batch = {'forget': dict(forget, pushed=pushed), 'retain': retain}
  loss, (_, metrics) = repair.repair_loss(variables['params'], variables['batch_stats'], batch,
                                          rng, hp, prep.model.apply)
  # the same forwards (same keys), then the formula in numpy
  from forgetmi_jax import rng as rng_lib
  out_f, stats = forward(prep.model.apply, variables['params'], variables['batch_stats'],
                         model_inputs(forget), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.REPAIR_FORGET_DROPOUT))
  out_r, _ = forward(prep.model.apply, variables['params'], stats, model_inputs(retain),
                     train=True, rng=jax.random.fold_in(rng, rng_lib.REPAIR_RETAIN_DROPOUT))
  fields = ('logits_img', 'logits_txt', 'logits_joint')
  labels = np.asarray(retain['label'])
  ce = np.mean(sum(-_log_softmax(np.asarray(getattr(out_r, f), np.float64))[
      np.arange(4), labels] for f in fields))
  kl = 0.0
  for h, f in enumerate(fields):
    t = _log_softmax(pushed[:, h].astype(np.float64) / 2.0)
    s = _log_softmax(np.asarray(getattr(out_f, f), np.float64) / 2.0)
    kl = kl + (np.exp(t) * (t - s)).sum(-1) * 4.0
  kl = kl[:3].mean()  # the padded row counts for nothing
  assert float(metrics['ce_retain']) == pytest.approx(ce, rel=1e-4)
  assert float(metrics['kl_forget']) == pytest.approx(kl, rel=1e-4)
  assert float(loss) == pytest.approx(ce + 0.5 * kl, rel=1e-4)


def test_pushed_logits_and_positions(prep):
  ctx = setup.make_context(prep, with_noisy_text=False)
  pushed = {'copy0': prep.init_variables(0), 'copy1': prep.init_variables(1)}
  cfg = repair.repair_group(prep.config.forgetmi)
  method = repair.RepairMethod(ctx, [loop.Copy(0, cfg, 'copy0'), loop.Copy(0, cfg, 'copy1')],
                               pushed)
  forget_idx = np.asarray(prep.split.forget_idx)
  for name, v in pushed.items():  # each copy anchors to its own pushed model, eval mode
    out, _ = forward(prep.model.apply, v['params'], v['batch_stats'],
                     model_inputs(prep.source.get_batch(forget_idx)), train=False)
    want = np.stack([out.logits_img, out.logits_txt, out.logits_joint], axis=1)
    np.testing.assert_allclose(method.pushed_logits(name), want, rtol=1e-5, atol=1e-5)
    assert method.start_variables(None, loop.Copy(0, cfg, name)) is v
  assert not np.allclose(method.pushed_logits('copy0'), method.pushed_logits('copy1'))
  batch = method.prepare_batch(next(iter(method.seed_batches(0, 0))), 0, 0)
  ids = np.asarray(batch['forget']['id'])
  np.testing.assert_array_equal(forget_idx[batch['forget']['position']], ids)
  assert 'forget_noisy' not in batch
  with pytest.raises(ValueError, match='copy2'):
    repair.RepairMethod(ctx, [loop.Copy(0, cfg, 'copy2')], pushed)


def test_repair_group_checks_and_off_switch(prep):
  group = copy.deepcopy(prep.config.forgetmi)
  assert repair.repair_group(group).epochs == 2
  group.repair.epochs = 0
  assert repair.repair_group(group) is None
  assert repair.repair_group(prep.config.forgetmi_paper) is None  # the paper's: no repair
  group.lr, group.repair.epochs, group.repair.lr_ratio = 1e-3, 1, 0.3
  assert repair.repair_group(group).lr == pytest.approx(3e-4)  # tied to the push's lr
  group.repair.lr_ratio = 0.0
  with pytest.raises(ValueError, match='repair.lr_ratio'):
    repair.repair_group(group)


def test_forget_rows_once_per_epoch_fewer_or_full(prep):
  """`repair.forget_batch_size`: N rows a step take the same cycled forget order N at a time
  beside the same retain rows; 0 (the default) is the forget set once per epoch; the rows are
  rounded up to the devices and hashed as run."""
  ctx = setup.make_context(prep, with_noisy_text=False)
  forget_idx = np.asarray(prep.split.forget_idx)
  n_forget, n_retain = len(forget_idx), len(prep.split.retain_idx)
  pushed = {'c': prep.init_variables(0)}

  def group_with(rows):
    group = copy.deepcopy(prep.config.forgetmi)
    group.repair.retain_examples = min(n_retain, 3 * n_forget)
    group.repair.forget_batch_size = rows
    return group

  def method(rows, num_devices=1):
    return repair.RepairMethod(ctx, [loop.Copy(0, repair.repair_group(group_with(rows)), 'c')],
                               pushed, num_devices=num_devices)

  bs = int(prep.config.forgetmi.batch_size)
  full, thin = method(bs), method(1)
  assert full.retain_examples() > n_forget  # the cycled epoch
  assert (full.forget_batch_size(), thin.forget_batch_size()) == (bs, 1)
  steps_full = list(full.seed_batches(0, 0))
  steps_thin = [thin.prepare_batch(b, 0, 0) for b in thin.seed_batches(0, 0)]
  assert len(steps_thin) == len(steps_full) == -(-full.retain_examples() // bs)
  for a, b in zip(steps_full, steps_thin):
    np.testing.assert_array_equal(a['retain']['id'], b['retain']['id'])
    assert b['forget']['id'].shape == (1,) and b['forget']['mask'].all()
    np.testing.assert_array_equal(forget_idx[b['forget']['position']], b['forget']['id'])
  order = np.concatenate([b['forget']['id'] for b in steps_full])
  thin_ids = np.concatenate([b['forget']['id'] for b in steps_thin])
  np.testing.assert_array_equal(thin_ids, order[:len(thin_ids)])
  rows = sum(int(np.sum(b['forget']['mask']) + np.sum(b['retain']['mask'])) for b in steps_thin)
  assert thin.epoch_examples(0) == rows == len(steps_thin) + full.retain_examples()
  # 0: ceil(forget / steps) rows, every forget image anchored in the epoch, at least once
  once = method(0)
  want = -(-n_forget // len(steps_full))
  assert once.forget_batch_size() == want < bs
  ids = np.concatenate([b['forget']['id'] for b in once.seed_batches(0, 0)])
  assert len(ids) == want * len(steps_full) and set(ids.tolist()) == set(forget_idx.tolist())
  assert once.epoch_examples(0) < full.epoch_examples(0)
  with pytest.raises(ValueError, match='repair.forget_batch_size'):
    repair.repair_group(group_with(bs + 1))
  # rounded up to the devices that split a step (4 rows on an 8-device TPU: 8), never above
  # batch_size
  assert method(1, num_devices=2).forget_batch_size() == 2
  assert method(1, num_devices=4 * bs).forget_batch_size() == bs
  # the fingerprint hashes the rows as run: 0 and the rows it means alike, a mesh that
  # rounds them otherwise
  def key(rows, p=prep):
    return setup.run_fingerprint(p, 'forgetmi', [loop.Copy(0, group_with(rows))])[0]
  two = dataclasses.replace(prep, mesh=types.SimpleNamespace(devices=np.empty(2)))
  assert key(0) == key(want) != key(bs)
  assert key(1) != key(1, two) == key(2, two)


def test_two_phase_run_starts_the_repair_from_the_pushed_model(prep, tmp_path):
  original = prep.init_variables(0)
  result = setup.run_method(prep, original, 'forgetmi', ckpt_root=str(tmp_path))
  (stop,) = result.stopping
  assert 'repair_epoch' in stop and stop['repair_epoch'] >= -1
  push_rows = [r for r in stop['scores'] if 'phase' not in r]
  repair_rows = [r for r in stop['scores'] if r.get('phase') == 'repair']
  assert [r['epoch'] for r in repair_rows] == list(range(-1, len(repair_rows) - 1))
  # the repair's start is the push's selected model, scored by the same rule
  push_best = next(r for r in push_rows if r['epoch'] == stop['best_epoch'])
  assert repair_rows[0]['val_gap'] == pytest.approx(push_best['val_gap'], abs=1e-6)
  assert stop['best_score'] == min(r['val_gap'] for r in repair_rows)
  assert setup.best_scores(stop)['val_gap'] == stop['best_score']
  assert setup.epochs_run(stop) == len(push_rows) + len(repair_rows) - 2
  assert any(h.get('phase') == 'repair' for h in result.histories[0])
  # without a stopping rule both phases run their epochs: the heads, frozen in the push,
  # train in the repair
  fixed = setup.run_method(prep, original, 'forgetmi', ckpt_root=str(tmp_path / 'fixed'),
                           stopping=None)
  assert fixed.stopping is None
  assert [h.get('phase') for h in fixed.histories[0]] == [None, None, 'repair', 'repair']
  head = lambda v: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(  # noqa
      v['params']['image_head'])])
  assert np.max(np.abs(head(fixed.states[0].variables) - head(original))) > 0
  # a rerun reloads both phases and reports the first run's seconds and variables
  again = setup.run_method(prep, original, 'forgetmi', ckpt_root=str(tmp_path))
  assert again.seconds == result.seconds
  for a, b in zip(jax.tree_util.tree_leaves(again.states[0].variables),
                  jax.tree_util.tree_leaves(result.states[0].variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



def test_budget_caps_push_and_repair_together(prep, tmp_path):
  """`forgetmi.budget`: push + repair + every score within budget x retraining's examples,
  the push within its share, each phase ended by the budget (not by its epochs or patience)."""
  original = prep.init_variables(0)
  retrain = setup.retrain_examples(prep)
  assert retrain == prep.config.train.epochs * len(prep.split.retain_idx)
  config = copy.deepcopy(prep.config)
  config.forgetmi.epochs = config.forgetmi.repair.epochs = 50
  config.stop.patience = 100  # only the budget ends these runs
  config.stop.at_chance = False
  p = dataclasses.replace(prep, config=config)
  score = loop.SCORE_COST * setup.validation_monitor(p, original).rows
  step = 2 * config.forgetmi.batch_size  # a step's forget + retain examples, at most
  # room for about three epochs of each phase, whatever the tiny cohort's sizes
  config.forgetmi.budget = 2 * (score + 3 * (score + 4 * step)) / retrain
  budget = config.forgetmi.budget * retrain
  result = setup.run_method(p, original, 'forgetmi', ckpt_root=str(tmp_path / 'a'))
  push = [h for h in result.histories[0] if 'phase' not in h]
  repaired = [h for h in result.histories[0] if h.get('phase') == 'repair']
  assert 0 < len(push) < 50 and 0 < len(repaired) < 50
  # a phase ends when not even half of its next epoch (loop.MIN_EPOCH_SHARE) and the score fit
  share = loop.MIN_EPOCH_SHARE
  push_epoch = max(h['steps'] for h in push) * step
  repair_epoch = max(h['steps'] for h in repaired) * step
  assert push[-1]['spent'] <= budget / 2 < (push[-1]['spent'] + score
                                             + max(step, share * push_epoch))
  assert result.spent == pytest.approx(push[-1]['spent'] + repaired[-1]['spent'])
  assert result.spent <= budget < result.spent + score + max(step, share * repair_epoch)
  # a whole repair epoch costs its real rows (hand-counted) and its score
  n_forget, size = len(prep.split.forget_idx), config.forgetmi.batch_size
  n_retain = min(config.forgetmi.repair.retain_examples, len(prep.split.retain_idx))
  rows = (-(-n_retain // size) * size + n_retain) if n_retain > n_forget else 2 * n_forget
  whole = [b['spent'] - a['spent'] for a, b in zip(repaired, repaired[1:])
           if b['steps'] == repaired[0]['steps']]
  assert whole and whole == pytest.approx([rows + score] * len(whole))
  with open(os.path.join(str(tmp_path / 'a'), 'forgetmi', result.fingerprint,
                         'DONE.json')) as f:
    assert json.load(f)['examples_per_copy'] == pytest.approx(result.spent)
  config.forgetmi.budget = -1.0
  with pytest.raises(ValueError, match='forgetmi.budget=-1.0'):
    setup.run_method(p, original, 'forgetmi', ckpt_root=str(tmp_path / 'b'))


def test_cached_programs_hold_no_patient_image(prep, tmp_path):
  """The compile cache (`config.compile_cache_dir`) keeps code: after a push and a repair
  (steps, scores, the pushed logits) no compiled program in it holds the pixels of a forget or
  retain image (data and weights are arguments), which a scan would see (the probe)."""
  cache_dir = jax.config.jax_compilation_cache_dir
  if not cache_dir:
    pytest.skip('the suite runs without a compile cache (conftest sets one)')
  setup.run_method(prep, prep.init_variables(0), 'forgetmi', ckpt_root=str(tmp_path / 'ck'))
  rows = np.concatenate([prep.split.forget_idx, prep.split.retain_idx])
  images = np.asarray(prep.cohort.get_images(rows), np.float32)
  middle = images.shape[1] // 2
  needles = {images[i, middle].tobytes() for i in range(len(images))}  # one row per image
  assert all(len(n) >= 64 for n in needles)
  scanned = 0
  for name in os.listdir(cache_dir):
    if not name.endswith('-cache') or name.startswith('jit_image_constant_probe'):
      continue
    try:
      with open(os.path.join(cache_dir, name), 'rb') as f:
        program = compilation_cache.decompress_executable(f.read())
    except Exception:  # noqa: BLE001 (another test process may be writing it)
      continue
    scanned += 1
    assert not any(n in program for n in needles), f'{name} holds an image row'
  assert scanned >= 5
  # the scan would see an image compiled in as a constant (this probe's own entry, skipped above)
  def image_constant_probe(x):
    return x + jnp.asarray(images[0])
  jax.jit(image_constant_probe).lower(np.zeros_like(images[0])).compile()
  found = False
  for name in os.listdir(cache_dir):
    if name.startswith('jit_image_constant_probe') and name.endswith('-cache'):
      with open(os.path.join(cache_dir, name), 'rb') as f:
        found |= images[0, middle].tobytes() in compilation_cache.decompress_executable(f.read())
  assert found
