"""Baseline unlearning methods: losses against numpy, which parameters one step moves, SCRUB's
phase switch, EU-k's re-initialisation. Smoke-sized model and hand-made batches."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, unlearn
from forgetmi_jax import config as config_lib
from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.multimodal import ModelOutputs, build_model, init_variables
from forgetmi_jax.train import optim
from forgetmi_jax.train.loop import Copy
from forgetmi_jax.train.optim import path_names
from forgetmi_jax.unlearning import registry
from forgetmi_jax.unlearning.blocks import encoder_blocks, last_k_mask
from forgetmi_jax.unlearning.method import UnlearningMethod, UnlearnContext
from forgetmi_jax.unlearning.multidelete import mismatch_permutation, multidelete_loss
from forgetmi_jax.unlearning.neggrad_plus import neggrad_plus_loss
from forgetmi_jax.unlearning.scrub import (ScrubMethod, distill_kl, epoch_phases,
                                           scrub_max_loss, scrub_min_loss)

BASELINES = ('neggrad_plus', 'scrub', 'cf_k', 'eu_k', 'multidelete')
B = 4


# ------------------------------------------------------------------------------ numpy helpers
def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, labels):
  return -np_log_softmax(logits)[np.arange(len(labels)), labels]


def np_kl(student, teacher, t):
  pt, ps = np_log_softmax(np.asarray(teacher) / t), np_log_softmax(np.asarray(student) / t)
  return (np.exp(pt) * (pt - ps)).sum(-1) * t * t


# ------------------------------------------------------------------------------ toy model
def toy_apply(variables, image, input_ids, attention_mask, train=False, rngs=None,
              mutable=None):
  """Linear 'model' with the ModelOutputs interface; deterministic in both modes."""
  p = variables['params']
  x = image.reshape(image.shape[0], -1)
  t = (input_ids * attention_mask).astype(jnp.float32)
  z_img, z_txt = x @ p['wi'], jnp.tanh(t @ p['wt'])
  z_joint = jnp.tanh(z_img + z_txt @ p['wf'])
  out = ModelOutputs(z_img=z_img, z_txt=z_txt, z_uni=jnp.concatenate([z_img, z_txt], -1),
                     z_joint=z_joint, logits_img=z_img @ p['hi'], logits_txt=z_txt @ p['ht'],
                     logits_joint=z_joint @ p['hj'])
  return (out, {'batch_stats': variables['batch_stats']}) if mutable else out


def toy_params(rng, scale=1.0):
  n = lambda *s: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
  return {'wi': n(4, 3), 'wt': n(5, 2), 'wf': n(2, 3), 'hi': n(3, 4), 'ht': n(2, 4),
          'hj': n(3, 4)}


def toy_np_outputs(p, x):
  flat = np.asarray(x['image'], np.float64).reshape(len(x['image']), -1)
  t = np.asarray(x['input_ids'] * x['attention_mask'], np.float64)
  z_img = flat @ p['wi']
  z_txt = np.tanh(t @ p['wt'])
  z_joint = np.tanh(z_img + z_txt @ p['wf'])
  return dict(z_img=z_img, z_txt=z_txt, z_joint=z_joint, logits_img=z_img @ p['hi'],
              logits_txt=z_txt @ p['ht'], logits_joint=z_joint @ p['hj'])


def toy_examples(rng, mask=(1, 1, 1, 0)):
  n = len(mask)
  return {'image': rng.uniform(size=(n, 2, 2, 1)).astype(np.float32),
          'input_ids': rng.integers(0, 3, size=(n, 5)).astype(np.int32),
          'attention_mask': np.ones((n, 5), np.int32),
          'label': rng.integers(0, 4, size=(n,)).astype(np.int32),
          'mask': np.asarray(mask, np.float32)}


def masked(v, mask):
  mask = np.asarray(mask) > 0
  return float(np.mean(np.asarray(v)[mask]))


def heads_ce_np(o, labels):
  return sum(np_ce(o[k], labels) for k in ('logits_img', 'logits_txt', 'logits_joint'))


# ------------------------------------------------------------------------------ losses
def test_neggrad_plus_loss_matches_numpy():
  rng = np.random.default_rng(0)
  p = toy_params(rng)
  batch = {'forget': toy_examples(rng), 'retain': toy_examples(rng, (1, 1, 1, 1))}
  beta = 0.9
  loss, (_, m) = neggrad_plus_loss(p, {}, None, batch, jax.random.PRNGKey(0),
                                   {'beta': jnp.float32(beta)}, toy_apply)
  ce_f = masked(heads_ce_np(toy_np_outputs(p, batch['forget']), batch['forget']['label']),
                batch['forget']['mask'])
  ce_r = masked(heads_ce_np(toy_np_outputs(p, batch['retain']), batch['retain']['label']),
                batch['retain']['mask'])
  np.testing.assert_allclose([m['ce_forget'], m['ce_retain']], [ce_f, ce_r], rtol=1e-5)
  np.testing.assert_allclose(loss, beta * ce_r - (1 - beta) * ce_f, rtol=1e-5)


def test_distill_kl_matches_numpy_and_is_zero_for_equal_logits():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4)) * 3
  for temp in (1.0, 4.0):
    np.testing.assert_allclose(distill_kl(jnp.asarray(s, jnp.float32),
                                          jnp.asarray(t, jnp.float32), temp),
                               np_kl(s, t, temp), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(distill_kl(jnp.asarray(s), jnp.asarray(s), 4.0), 0, atol=1e-6)
  assert np.all(np.asarray(distill_kl(jnp.asarray(s), jnp.asarray(t), 4.0)) > 0)


def test_scrub_losses_match_numpy():
  rng = np.random.default_rng(2)
  student, teacher = toy_params(rng), toy_params(rng)
  original = {'params': teacher, 'batch_stats': {}}
  hp = {'temperature': jnp.float32(4.0), 'gamma': jnp.float32(1.0), 'alpha': jnp.float32(0.5)}
  forget, retain = toy_examples(rng), toy_examples(rng, (1, 1, 0, 0))
  heads = ('logits_img', 'logits_txt', 'logits_joint')

  def kl(x):
    so, to = toy_np_outputs(student, x), toy_np_outputs(teacher, x)
    return sum(np_kl(so[h], to[h], 4.0) for h in heads)
  loss_max, _ = scrub_max_loss(student, {}, original, {'forget': forget},
                               jax.random.PRNGKey(0), hp, toy_apply)
  np.testing.assert_allclose(loss_max, -masked(kl(forget), forget['mask']), rtol=1e-4)
  loss_min, (_, m) = scrub_min_loss(student, {}, original, {'retain': retain},
                                    jax.random.PRNGKey(0), hp, toy_apply)
  ce = masked(heads_ce_np(toy_np_outputs(student, retain), retain['label']), retain['mask'])
  np.testing.assert_allclose(m['ce_retain'], ce, rtol=1e-5)
  np.testing.assert_allclose(loss_min, ce + 0.5 * masked(kl(retain), retain['mask']), rtol=1e-4)


def test_multidelete_loss_matches_numpy():
  rng = np.random.default_rng(3)
  student, teacher = toy_params(rng), toy_params(rng)
  forget, retain = toy_examples(rng), toy_examples(rng, (1, 0, 1, 1))
  batch = {'forget': forget, 'retain': retain}
  key = jax.random.PRNGKey(5)
  w = {'md': jnp.float32(1.0), 'mkr': jnp.float32(2.0), 'ukr': jnp.float32(0.5)}
  loss, (_, m) = multidelete_loss(student, {}, {'params': teacher, 'batch_stats': {}}, batch,
                                  key, {'weights': w}, toy_apply)
  perm = np.asarray(mismatch_permutation(jnp.asarray(forget['mask']),
                                         jax.random.fold_in(key, rng_lib.MULTIDELETE_PERMUTE)))
  mis = dict(forget, input_ids=forget['input_ids'][perm],
             attention_mask=forget['attention_mask'][perm])
  uf, tm = toy_np_outputs(student, forget), toy_np_outputs(teacher, mis)
  ur, tr = toy_np_outputs(student, retain), toy_np_outputs(teacher, retain)
  md = masked(np.mean((uf['z_joint'] - tm['z_joint']) ** 2, -1), forget['mask'])
  mkr = masked(np.mean((ur['z_joint'] - tr['z_joint']) ** 2, -1), retain['mask'])
  ukr = masked(np.mean((ur['z_img'] - tr['z_img']) ** 2, -1), retain['mask'])
  np.testing.assert_allclose([m['md'], m['mkr'], m['ukr']], [md, mkr, ukr], rtol=1e-5)
  np.testing.assert_allclose(loss, md + 2 * mkr + 0.5 * ukr, rtol=1e-5)
  # The decoupling target really is a mismatched pair: it differs from the true pair's.
  assert not np.allclose(tm['z_joint'][:3], toy_np_outputs(teacher, forget)['z_joint'][:3])


@pytest.mark.parametrize('mask', [(1, 1, 1, 0, 0), (1, 1, 1, 1, 1), (0, 1, 1, 0, 1), (1, 1)])
def test_mismatch_permutation_is_a_derangement_of_real_rows(mask):
  mask = np.asarray(mask, np.float32)
  real = np.flatnonzero(mask)
  for seed in range(6):
    perm = np.asarray(mismatch_permutation(jnp.asarray(mask), jax.random.PRNGKey(seed)))
    assert sorted(perm.tolist()) == list(range(len(mask)))  # a permutation
    assert np.all(perm[real] != real)  # every real row gets another row's text ...
    assert set(perm[real].tolist()) == set(real.tolist())  # ... a real one
    pad = np.flatnonzero(mask == 0)
    assert np.all(perm[pad] == pad)


# ------------------------------------------------------------------------------ SCRUB phases
def test_scrub_phases_switch_at_msteps():
  assert [epoch_phases(e, 3) for e in range(5)] == [('max', 'min')] * 3 + [('min',)] * 2
  assert epoch_phases(0, 0) == ('min',)


def test_scrub_epoch_passes_forget_then_retain(monkeypatch):
  paired = [{'forget': {'id': np.array([i])}, 'retain': {'id': np.array([10 + i])},
             'forget_noisy': {}} for i in range(3)]
  monkeypatch.setattr(UnlearningMethod, 'paired_batches',
                      lambda self, epoch, seed, retain_examples=None: iter(paired))
  whole = [{'id': np.array([20 + i])} for i in range(5)]  # the whole retain set, 5 batches
  monkeypatch.setattr(UnlearningMethod, 'retain_batches', lambda self, epoch, seed: iter(whole))
  cfg = base.get_config().scrub
  cfg.retain_pass = 'sample'
  method = ScrubMethod(None, [Copy(0, cfg)])

  def plan(epoch):
    return [(next(iter(b)), int(next(iter(b.values()))['id'][0]))
            for b in method.seed_batches(epoch, 0)]
  max_epoch = plan(int(cfg.msteps) - 1)
  assert max_epoch == [('forget', 0), ('forget', 1), ('forget', 2),
                       ('retain', 10), ('retain', 11), ('retain', 12)]
  assert plan(int(cfg.msteps)) == [('retain', 10), ('retain', 11), ('retain', 12)]
  cfg = base.get_config().scrub  # the reference budget: the min phase is a whole retain pass
  assert cfg.retain_pass == 'full'
  method = ScrubMethod(None, [Copy(0, cfg)])
  assert plan(int(cfg.msteps) - 1) == [('forget', 0), ('forget', 1), ('forget', 2)] + [
      ('retain', 20 + i) for i in range(5)]
  assert plan(int(cfg.msteps)) == [('retain', 20 + i) for i in range(5)]


# ------------------------------------------------------------------------------ real model
@pytest.fixture(scope='module')
def smoke():
  config = base.get_config('smoke')
  model, _, _ = build_model(config.model)
  size, length = int(config.data.image_size), int(config.data.max_text_len)
  variables = init_variables(model, jax.random.PRNGKey(0), size, length)
  ctx = UnlearnContext(model, None, None,
                       init_params=lambda key: init_variables(model, key, size, length)['params'])
  rng = np.random.default_rng(0)
  # Look "trained": no zero biases, no init-valued BatchNorm statistics.
  jitter = lambda t, s: jax.tree_util.tree_map(  # noqa: E731
      lambda x: x + np.abs(rng.normal(scale=s, size=x.shape)).astype(x.dtype), t)
  original = {'params': jitter(variables['params'], 0.01),
              'batch_stats': jitter(variables['batch_stats'], 0.1)}

  def examples(n):
    return {'image': rng.uniform(size=(n, size, size, 1)).astype(np.float32),
            'input_ids': rng.integers(1, 600, size=(n, length)).astype(np.int32),
            'attention_mask': np.ones((n, length), np.int32),
            'label': rng.integers(0, 4, size=(n,)).astype(np.int32),
            'id': np.arange(n, dtype=np.int32), 'mask': np.ones((n,), np.float32)}
  paired = {'forget': examples(B), 'retain': examples(B), 'forget_noisy': examples(B)}
  return types.SimpleNamespace(config=config, ctx=ctx, original=original, paired=paired,
                               retain=examples(B))


def one_step(smoke, name, batch):
  method = registry.get(name)(smoke.ctx, [Copy(0, smoke.config[name])])
  state = method.init_state(smoke.original, method.copies[0])
  start = jax.tree_util.tree_map(np.asarray, (state.params, state.batch_stats))
  new, metrics = jax.jit(method.step)(state, smoke.original, batch, jax.random.PRNGKey(1),
                                      method.hparams(method.copies[0]))
  assert np.isfinite(float(metrics['loss']))
  return method, start, jax.tree_util.tree_map(np.asarray, (new.params, new.batch_stats))


def changed(a, b):
  """{path: bool} leaf by leaf: did the value change at all?"""
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_leaves(b)
  return {'/'.join(path_names(p)): not np.array_equal(x, y) for (p, x), y in zip(flat_a, flat_b)}


def moved_modules(ch):
  return {k.split('/')[0] for k, v in ch.items() if v}


def test_registry_and_presets():
  assert registry.names()[0] == 'forgetmi' and set(BASELINES) < set(registry.names())
  for name in registry.names():
    assert issubclass(registry.get(name), UnlearningMethod)
    for pct in (3, 6, 10):
      c = unlearn.get_config(f'method={name},pct={pct}')
      assert c.method == name and abs(c.forget_fraction - pct / 100) < 1e-9
      assert c.forgetmi.setting == config_lib.BEST_SETTING[pct]
      assert c.forgetmi.repair.epochs == unlearn.REPAIR_EPOCHS[pct]
      config_lib.resolve(c)  # valid as a whole
  assert unlearn.get_config('pct=10,smoke').forgetmi.repair.epochs == 0  # smoke stays tiny
  with pytest.raises(ValueError, match='pct=4'):
    unlearn.get_config('method=scrub,pct=4')
  with pytest.raises(ValueError, match="unknown config argument 'mehtod'"):
    unlearn.get_config('mehtod=scrub')


def test_block_discovery_is_numeric_and_last_k_mask_picks_names():
  tree = {'image_encoder': {f'stage{i}_block{j}': {'w': 0} for i in (0, 2, 10)
                            for j in (0, 1)} | {'stem_conv': {'w': 0}},
          'text_encoder': {'embeddings': {'w': 0}, 'pooler': {'w': 0},
                           **{f'layer_{i}': {'w': 0} for i in range(11)}},
          'fusion': {'w': 0}, 'image_head': {'w': 0}}
  assert encoder_blocks(tree, 'image_encoder')[-2:] == ['stage10_block0', 'stage10_block1']
  assert encoder_blocks(tree, 'text_encoder')[-1] == 'layer_10'
  mask = last_k_mask(tree, 3, 2)
  assert {b for b, v in mask['image_encoder'].items() if v['w']} == {
      'stage2_block1', 'stage10_block0', 'stage10_block1'}
  assert sorted(b for b, v in mask['text_encoder'].items() if v['w']) == [
      'layer_10', 'layer_9', 'pooler']
  assert mask['fusion']['w'] and mask['image_head']['w']
  assert not any(jax.tree_util.tree_leaves(last_k_mask(tree, 0, 0)['image_encoder']))


def test_sgd_zero_update_for_frozen_leaves():
  params = {'a': {'kernel': jnp.ones(3)}, 'b': {'kernel': jnp.ones(3)}}
  tx = optim.sgd(0.1, 0.9, 0.01, frozen_mask={'a': {'kernel': True}, 'b': {'kernel': False}})
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['a']['kernel'], 0)
  np.testing.assert_allclose(updates['b']['kernel'], -0.1 * 1.01)


@pytest.mark.parametrize('name', ['neggrad_plus', 'scrub'])
def test_whole_model_methods_move_every_module(smoke, name):
  batch = smoke.paired
  if name == 'scrub':
    batch = {'forget': smoke.paired['forget']}  # a max step
  _, (p0, _), (p1, _) = one_step(smoke, name, batch)
  assert moved_modules(changed(p0, p1)) == {'image_encoder', 'text_encoder', 'fusion',
                                            'image_head', 'text_head', 'joint_head'}
  if name == 'scrub':  # and a min step
    _, (p0, _), (p1, _) = one_step(smoke, name, {'retain': smoke.paired['retain']})
    assert 'image_head' in moved_modules(changed(p0, p1))


def test_multidelete_step_keeps_heads_bit_identical(smoke):
  _, (p0, _), (p1, _) = one_step(smoke, 'multidelete', smoke.paired)
  assert moved_modules(changed(p0, p1)) == {'image_encoder', 'text_encoder', 'fusion'}


def expected_trainable(key, k_image, k_text):
  """The smoke model's last-k set written out by hand (small32: 3 stages x 1 block; 1 layer)."""
  image_blocks = ['stage0_block0', 'stage1_block0', 'stage2_block0']
  parts = key.split('/')
  if parts[0] == 'image_encoder':  # the projection to the text width runs after the blocks
    return parts[1] == 'projection' or parts[1] in image_blocks[len(image_blocks) - k_image:]
  if parts[0] == 'text_encoder':
    return parts[1] == 'pooler' or (k_text >= 1 and parts[1] == 'layer_0')
  return True


@pytest.mark.parametrize('name', ['cf_k', 'eu_k'])
def test_last_k_methods_move_only_the_last_blocks(smoke, name):
  cfg = smoke.config[name]
  method, (p0, s0), (p1, s1) = one_step(smoke, name, smoke.retain)
  ch = changed(p0, p1)
  trainable = {k: expected_trainable(k, int(cfg.k_image), int(cfg.k_text)) for k in ch}
  assert any(not t for t in trainable.values()) and any(trainable.values())
  assert {k for k, t in trainable.items() if not t and ch[k]} == set()  # frozen: bit-identical
  # Trainable: all moved, except the attention key bias, whose gradient is exactly 0 (it adds
  # the same q.b to every key's score, which the softmax cancels) and which has no decay.
  assert {k for k, t in trainable.items() if t and not ch[k]} <= {'text_encoder/layer_0/key/bias'}
  # BatchNorm statistics of frozen blocks do not move either; the trained ones do.
  sch = changed(s0, s1)
  for k, c in sch.items():
    assert c == expected_trainable(k, int(cfg.k_image), int(cfg.k_text)), k


def test_eu_k_reinitialises_exactly_the_last_blocks(smoke):
  cfg = smoke.config.eu_k
  method = registry.get('eu_k')(smoke.ctx, [Copy(0, cfg)])
  state = method.init_state(smoke.original, method.copies[0])
  ch = changed(smoke.original['params'], state.params)
  for k, c in ch.items():
    assert c == expected_trainable(k, int(cfg.k_image), int(cfg.k_text)), k
  sch = changed(smoke.original['batch_stats'], state.batch_stats)
  stats = jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]
  for path, v in stats:
    key = '/'.join(path_names(path))
    if expected_trainable(key, int(cfg.k_image), int(cfg.k_text)):
      np.testing.assert_array_equal(v, 1.0 if key.endswith('var') else 0.0)
    else:
      assert not sch[key]
  # CF-k starts from the original unchanged.
  cf_method = registry.get('cf_k')(smoke.ctx, [Copy(0, smoke.config.cf_k)])
  cf = cf_method.init_state(smoke.original, cf_method.copies[0])
  assert not any(changed(smoke.original['params'], cf.params).values())
