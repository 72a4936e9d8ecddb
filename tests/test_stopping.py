"""Early stopping on the loop: each copy ends at its best-scoring epoch, a copy stops after
`patience` epochs without improvement, the run ends once all have stopped, and a resumed run
ends where an uninterrupted one does."""
import copy

import jax
import numpy as np
import pytest

from forgetmi_jax.runs import setup as run_setup
from forgetmi_jax.train import loop
from forgetmi_jax.train.checkpoints import Checkpoints
from forgetmi_jax.unlearning.neggrad_plus import NegGradPlusMethod
from tests.helpers import tiny_config


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('stopping'), **{'neggrad_plus.epochs': 6})
  return run_setup.prepare(config)


class Scripted:
  """Scores from a script, in call order: the loop scores copy 0, 1, ... of epoch -1, then
  of epoch 0, ... (stopped copies are no longer scored)."""

  def __init__(self, per_copy, start_epoch=-1):
    self.per_copy = per_copy
    self.epoch = {j: start_epoch for j in per_copy}
    self.calls = []

  def __call__(self, variables):
    active = [j for j in self.per_copy if self.epoch[j] is not None]
    j = min(active, key=lambda k: (self.epoch[k], k))
    score = self.per_copy[j][self.epoch[j] + 1]
    self.calls.append((j, self.epoch[j]))
    self.epoch[j] += 1
    if self.epoch[j] + 1 >= len(self.per_copy[j]):
      self.epoch[j] = None
    return {'val_gap': score, 'member_auc': 0.5}


def _method(prep, n, epochs):
  cfg = copy.deepcopy(prep.config.neggrad_plus)
  cfg.epochs = epochs
  ctx = run_setup.make_context(prep, with_noisy_text=False)
  return NegGradPlusMethod(ctx, [loop.Copy(0, cfg)] * n)


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_copy_ends_at_its_best_epoch_and_the_run_stops(prep, tmp_path):
  original = prep.init_variables(0)
  # copy 0: best after epoch 1 (0.5), no better in epochs 2, 3 -> stops after epoch 3
  # copy 1: keeps improving until epoch 4, then 5 is worse -> the run needs epochs 0..5
  scores = {0: [1.0, 0.8, 0.5, 0.6, 0.7], 1: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.55]}
  rule = loop.Stopping(Scripted(scores), patience=2)
  result = loop.run(_method(prep, 2, 6), original, str(tmp_path / 'stop'), stopping=rule)
  assert [s['best_epoch'] for s in result.stopping] == [1, 4]
  assert [s['epochs_scored'] for s in result.stopping] == [5, 7]
  assert result.stopping[0]['stopped'] and not result.stopping[1]['stopped']
  assert [s['best_score'] for s in result.stopping] == [0.5, 0.5]
  # the end state of each copy is its best epoch's: the same program run for best+1 epochs
  plain = loop.run(_method(prep, 2, 2), original, str(tmp_path / 'two'))
  _same(result.states[0].params, plain.states[0].params)
  _same(result.states[0].batch_stats, plain.states[0].batch_stats)
  plain5 = loop.run(_method(prep, 2, 5), original, str(tmp_path / 'five'))
  _same(result.states[1].params, plain5.states[1].params)
  assert result.histories[0][1]['val_gap'] == 0.5


def test_all_copies_stopped_ends_the_run_early(prep, tmp_path):
  original = prep.init_variables(0)
  rule = loop.Stopping(Scripted({0: [1.0, 0.7, 0.9, 0.9]}), patience=2)
  result = loop.run(_method(prep, 1, 6), original, str(tmp_path / 'early'), stopping=rule)
  assert len(result.histories[0]) == 3  # epochs 0, 1, 2 of 6
  assert result.stopping[0]['best_epoch'] == 0


def test_a_method_that_only_hurts_returns_its_start(prep, tmp_path):
  original = prep.init_variables(0)
  rule = loop.Stopping(Scripted({0: [0.2, 0.5, 0.6]}), patience=2)
  result = loop.run(_method(prep, 1, 6), original, str(tmp_path / 'hurts'), stopping=rule)
  assert result.stopping[0]['best_epoch'] == -1
  _same(result.states[0].params, original['params'])


def test_resumed_run_ends_where_the_uninterrupted_one_does(prep, tmp_path):
  original = prep.init_variables(0)
  scores = [1.0, 0.9, 0.6, 0.8, 0.7, 0.9]  # best after epoch 1; stops after epoch 3
  full = loop.run(_method(prep, 1, 6), original, str(tmp_path / 'full'),
                  stopping=loop.Stopping(Scripted({0: scores}), patience=2))
  # the same run killed after epoch 2 (a 3-epoch run in the same folder), then resumed
  part = tmp_path / 'part'
  loop.run(_method(prep, 1, 3), original, str(part),
           stopping=loop.Stopping(Scripted({0: scores[:4]}), patience=2))
  rest = Scripted({0: scores}, start_epoch=3)  # the resumed run scores epochs 3, ...
  resumed = loop.run(_method(prep, 1, 6), original, str(part),
                     stopping=loop.Stopping(rest, patience=2))
  assert resumed.resumed_from == [3] and rest.calls == [(0, 3)]  # only epoch 3 was scored
  assert resumed.stopping[0]['best_epoch'] == full.stopping[0]['best_epoch'] == 1
  _same(resumed.states[0].params, full.states[0].params)
  # and a rerun of the finished run trains nothing more
  again = loop.run(_method(prep, 1, 6), original, str(part),
                   stopping=loop.Stopping(Scripted({0: []}), patience=2))
  _same(again.states[0].params, full.states[0].params)


def _read_back(method, original, directory):
  """(last states, final states) of a finished run read from its checkpoint folder, as
  experiments/evaluate.py reads them."""
  ckpt = Checkpoints(str(directory))
  try:
    restored, extra = ckpt.restore(loop.stack([method.init_state(original, c)
                                               for c in method.copies]))
  finally:
    ckpt.close()
  last = loop.unstack(restored, len(method.copies))
  return last, loop.final_states(last, extra, str(directory))


def test_reevaluation_restores_the_best_epoch(prep, tmp_path):
  """A finished stopped run read back from its checkpoint folder (experiments/evaluate.py's
  path) gives each copy's best epoch, not its last state."""
  original = prep.init_variables(0)
  rule = loop.Stopping(Scripted({0: [1.0, 0.5, 0.9, 0.9], 1: [1.0, 0.9, 0.8, 0.7, 0.6]}),
                       patience=2)
  method = _method(prep, 2, 3)
  result = loop.run(method, original, str(tmp_path / 'r'), stopping=rule)
  last, final = _read_back(method, original, tmp_path / 'r')
  for got, want in zip(final, result.states):
    _same(got.params, want.params)
  assert result.stopping[0]['best_epoch'] == 0
  assert not np.array_equal(jax.tree.leaves(last[0].params)[0],
                            jax.tree.leaves(final[0].params)[0])


def _epoch_rows(method, epoch):
  """Real examples of each step of an epoch, counted from the method's own batches."""
  return [int(sum(np.sum(np.asarray(v['mask'])) for v in b.values()
                  if isinstance(v, dict) and 'mask' in v))
          for b in method.seed_batches(epoch, 0)]


def test_example_budget_ends_inside_it_and_counts_scores(prep, tmp_path):
  original = prep.init_variables(0)
  method = _method(prep, 1, 6)
  rows0, rows1 = _epoch_rows(method, 0), _epoch_rows(method, 1)
  assert len(rows1) >= 2
  score_rows = 30
  score = loop.SCORE_COST * score_rows
  # the start's score, epoch 0, epoch 1's first step, epoch 1's score, and a bit less than
  # epoch 1's second step: the run must stop after exactly one step of epoch 1
  budget = score + sum(rows0) + score + rows1[0] + score + rows1[1] - 0.5
  rule = loop.Stopping(Scripted({0: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]}), patience=2,
                       score_rows=score_rows)
  result = loop.run(method, original, str(tmp_path / 'budget'), stopping=rule,
                    example_budget=budget)
  assert [h['steps'] for h in result.histories[0]] == [len(rows0), 1]
  assert result.spent == pytest.approx(3 * score + sum(rows0) + rows1[0])
  assert result.spent <= budget
  assert result.stopping[0]['epochs_scored'] == 3  # start, epoch 0, the cut epoch 1
  assert result.stopping[0]['best_epoch'] == 1  # the cut epoch is scored like any other
  # a budget that holds the start's score but no step and its score: nothing is trained
  rule = loop.Stopping(Scripted({0: [1.0, 0.9]}), patience=2, score_rows=score_rows)
  none = loop.run(_method(prep, 1, 6), original, str(tmp_path / 'none'), stopping=rule,
                  example_budget=2 * score + min(rows0) - 0.5)
  assert none.histories[0] == [] and none.spent == pytest.approx(score)
  _same(none.states[0].params, original['params'])


class _Announced(NegGradPlusMethod):
  """NegGrad+ telling the loop its epoch's size, counted from its own batches."""

  def epoch_examples(self, epoch):
    return sum(_epoch_rows(self, epoch))


def test_paired_examples_counts_the_epochs_real_rows(prep):
  method = _method(prep, 1, 2)
  assert method.paired_examples() == sum(_epoch_rows(method, 0))  # forget set + equal sample
  full = copy.deepcopy(prep.config.neggrad_plus)
  full.retain_pass = 'full'  # the whole retain set, the forget set cycled in full batches
  ctx = run_setup.make_context(prep, with_noisy_text=False)
  whole = NegGradPlusMethod(ctx, [loop.Copy(0, full)])
  retain = len(prep.split.retain_idx)
  assert retain > len(prep.split.forget_idx)
  assert whole.paired_examples(retain) == sum(_epoch_rows(whole, 0))


def test_an_epoch_that_cannot_mostly_run_is_not_begun(prep, tmp_path):
  original = prep.init_variables(0)
  cfg = copy.deepcopy(prep.config.neggrad_plus)
  cfg.epochs, cfg.batch_size = 6, 2  # several steps per epoch
  method = _Announced(run_setup.make_context(prep, with_noisy_text=False), [loop.Copy(0, cfg)])
  rows0, rows1 = _epoch_rows(method, 0), _epoch_rows(method, 1)
  assert len(rows1) >= 3
  score_rows = 30
  score = loop.SCORE_COST * score_rows
  # the start's score, epoch 0 and its score, then room for epoch 1's first step and its
  # score but for less than half of epoch 1: without the share rule one step would run
  budget = 3 * score + sum(rows0) + min(rows1[0] + 0.5, loop.MIN_EPOCH_SHARE * sum(rows1) - 0.5)
  assert budget - 3 * score - sum(rows0) >= rows1[0]
  rule = loop.Stopping(Scripted({0: [1.0, 0.9, 0.8]}), patience=2, score_rows=score_rows)
  result = loop.run(method, original, str(tmp_path / 'share'), stopping=rule,
                    example_budget=budget)
  assert [h['steps'] for h in result.histories[0]] == [len(rows0)]
  assert result.spent == pytest.approx(2 * score + sum(rows0))
  # with half of epoch 1 in the budget, it is begun (and cut by the budget)
  budget = 3 * score + sum(rows0) + loop.MIN_EPOCH_SHARE * sum(rows1)
  rule = loop.Stopping(Scripted({0: [1.0, 0.9, 0.8]}), patience=2, score_rows=score_rows)
  half = loop.run(method, original, str(tmp_path / 'half'), stopping=rule,
                  example_budget=budget)
  steps = [h['steps'] for h in half.histories[0]]
  assert steps[0] == len(rows0) and 0 < steps[1] < len(rows1)
  assert half.spent <= budget


def _epochs_on_disk(directory):
  ckpt = Checkpoints(str(directory))
  try:
    return sorted(ckpt.manager.all_steps())
  finally:
    ckpt.close()


def test_checkpoint_interval_writes_the_last_epoch_and_the_same_result(prep, tmp_path):
  """`checkpoint_every_s`: no epoch is written before the interval has passed, the run's last
  epoch always is (its result), and what it trains does not change."""
  original = prep.init_variables(0)
  every = loop.run(_method(prep, 1, 3), original, str(tmp_path / 'every'))
  sparse = loop.run(_method(prep, 1, 3), original, str(tmp_path / 'sparse'),
                    checkpoint_every_s=1e9)
  assert _epochs_on_disk(tmp_path / 'every') == [1, 2]  # max_to_keep=2: every epoch written
  assert _epochs_on_disk(tmp_path / 'sparse') == [2]
  _same(sparse.states[0].params, every.states[0].params)
  # a rerun of the finished run reads that last epoch and trains nothing more
  again = loop.run(_method(prep, 1, 3), original, str(tmp_path / 'sparse'),
                   checkpoint_every_s=1e9)
  assert again.resumed_from == [3] and len(again.histories[0]) == 3
  _same(again.states[0].params, every.states[0].params)
  # a run that an interval left unwritten after epoch 0 resumes from there and ends the same
  loop.run(_method(prep, 1, 1), original, str(tmp_path / 'part'), checkpoint_every_s=1e9)
  resumed = loop.run(_method(prep, 1, 3), original, str(tmp_path / 'part'),
                     checkpoint_every_s=1e9)
  assert resumed.resumed_from == [1]
  _same(resumed.states[0].params, every.states[0].params)


def test_checkpoint_interval_keeps_the_best_model_the_checkpoint_names(prep, tmp_path):
  """A stopped run with unwritten epochs: the best-model folders it superseded go once the
  last checkpoint names the newest, and reading the run back gives each copy's best epoch."""
  original = prep.init_variables(0)
  scores = {0: [1.0, 0.9, 0.8, 0.9, 0.9]}  # new bests after epochs 0 and 1; stops after 3
  result = loop.run(_method(prep, 1, 6), original, str(tmp_path / 'r'),
                    stopping=loop.Stopping(Scripted(scores), patience=2),
                    checkpoint_every_s=1e9)
  assert result.stopping[0]['best_epoch'] == 1
  assert _epochs_on_disk(tmp_path / 'r') == [3]
  assert sorted(p.name for p in (tmp_path / 'r').iterdir() if p.name.startswith('best')) == [
      'best-after-1']
  _, final = _read_back(_method(prep, 1, 6), original, tmp_path / 'r')
  _same(final[0].params, result.states[0].params)
  plain = loop.run(_method(prep, 1, 2), original, str(tmp_path / 'two'))
  _same(result.states[0].params, plain.states[0].params)
