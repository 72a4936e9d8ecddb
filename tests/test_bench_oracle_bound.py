"""benchmarks/bench_oracle_bound.py: each copy anchors to its own retrained model (forget rows,
and retain rows with targets='all'), its `all` loss against numpy, and one epoch's row."""
import os
import sys

import jax
import numpy as np
import pytest

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.runs import setup
from forgetmi_jax.train import loop
from forgetmi_jax.unlearning import repair
from tests.helpers import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))

import bench_oracle_bound as oracle  # noqa: E402


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('oracle'), **{
      'forgetmi.repair.epochs': 1, 'forgetmi.repair.retain_examples': 16})
  return setup.prepare(config)


def _heads(v, prep, idx):
  out, _ = forward(prep.model.apply, v['params'], v['batch_stats'],
                   model_inputs(prep.source.get_batch(np.asarray(idx))), train=False)
  return np.stack([out.logits_img, out.logits_txt, out.logits_joint], axis=1)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_each_copy_reads_its_own_retrained_model(prep):
  original = prep.init_variables(0)
  teachers = {'copy1': prep.init_variables(1), 'copy2': prep.init_variables(2)}
  cfg = repair.repair_group(prep.config.forgetmi)
  copies = [loop.Copy(1, cfg, 'copy1'), loop.Copy(2, cfg, 'copy2')]
  method = oracle.OracleRepair(setup.make_context(prep, with_noisy_text=False), copies,
                               original, teachers, 'all')
  for c in copies:
    assert method.start_variables(None, c) is original  # from the original, not pushed
    hp = method.hparams(c)
    np.testing.assert_allclose(hp['pushed_forget_logits'],
                               _heads(teachers[c.name], prep, prep.split.forget_idx),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hp['retrained_retain_logits'],
                               _heads(teachers[c.name], prep, prep.split.retain_idx),
                               rtol=1e-5, atol=1e-5)
  assert not np.allclose(method.hparams(copies[0])['pushed_forget_logits'],
                         method.hparams(copies[1])['pushed_forget_logits'])
  batch = method.prepare_batch(next(iter(method.seed_batches(0, 1))), 0, 1)
  retain_idx = np.asarray(prep.split.retain_idx)
  np.testing.assert_array_equal(retain_idx[batch['retain']['position']], batch['retain']['id'])
  with pytest.raises(ValueError, match='targets'):
    oracle.OracleRepair(method.ctx, copies, original, teachers, 'retain')


def test_all_targets_loss_is_two_kls(prep):
  """targets='all': KL to the retrained logits on the retain rows + anchor x on the forget
  rows (the step's metrics against numpy, same forwards and keys)."""
  original, teacher = prep.init_variables(0), prep.init_variables(1)
  cfg = repair.repair_group(prep.config.forgetmi)
  method = oracle.OracleRepair(setup.make_context(prep, with_noisy_text=False),
                               [loop.Copy(0, cfg, 'c')], original, {'c': teacher}, 'all')
  batch = method.prepare_batch(next(iter(method.seed_batches(0, 0))), 0, 0)
  hp = method.hparams(method.copies[0])
  state = method.init_state(original, method.copies[0])
  rng = jax.random.PRNGKey(5)
  _, metrics = method.step(state, original, batch, rng, hp)
  f, r = batch['forget'], batch['retain']
  out_f, stats = forward(prep.model.apply, original['params'], original['batch_stats'],
                         model_inputs(f), train=True,
                         rng=jax.random.fold_in(rng, rng_lib.REPAIR_FORGET_DROPOUT))
  out_r, _ = forward(prep.model.apply, original['params'], stats, model_inputs(r), train=True,
                     rng=jax.random.fold_in(rng, rng_lib.REPAIR_RETAIN_DROPOUT))
  t = float(cfg.temperature)

  def kl(out, targets, mask):
    total = 0.0
    for h, field in enumerate(('logits_img', 'logits_txt', 'logits_joint')):
      p = _log_softmax(np.asarray(targets[:, h], np.float64) / t)
      q = _log_softmax(np.asarray(getattr(out, field), np.float64) / t)
      total = total + (np.exp(p) * (p - q)).sum(-1) * t * t
    mask = np.asarray(mask, bool)
    return total[mask].mean()
  want_f = kl(out_f, np.asarray(hp['pushed_forget_logits'])[f['position']], f['mask'])
  want_r = kl(out_r, np.asarray(hp['retrained_retain_logits'])[r['position']], r['mask'])
  assert float(metrics['kl_forget']) == pytest.approx(want_f, rel=1e-4)
  assert float(metrics['kl_retain']) == pytest.approx(want_r, rel=1e-4)
  assert float(metrics['loss']) == pytest.approx(want_r + float(cfg.anchor) * want_f, rel=1e-4)


def test_one_epoch_row(prep, tmp_path):
  original = prep.init_variables(0)
  retrained = [prep.init_variables(1), prep.init_variables(2)]
  rows, seconds = oracle.oracle_rows(prep, original, retrained, [0, 1], 1e-3, 1, 'forget',
                                     str(tmp_path))
  cfg = repair.repair_group(prep.config.forgetmi)
  probe = repair.RepairMethod(setup.make_context(prep, with_noisy_text=False),
                              [loop.Copy(0, cfg, 'c')], {'c': original})
  assert len(rows) == 1 and rows[0]['epoch'] == 1 and seconds > 0
  assert rows[0]['examples'] == probe.epoch_examples(0)
  gaps = rows[0]['avg_gap']['values']
  assert len(gaps) == 2 and all(0 <= g <= 1 for g in gaps)
  assert oracle.first_within(rows, 1.0) is rows[0]
  assert oracle.first_within(rows, -1.0) is None
