"""The comparison runner: tuning pieces in isolation, then the whole smoke comparison."""
import dataclasses
import datetime
import json
import math
import os

import jax
import numpy as np
import pytest

from configs import compare_10pct
from forgetmi_jax.data.pipeline import ExampleSource
from forgetmi_jax.evaluation import report
from forgetmi_jax.evaluation.report import PAPER_TABLE1
from forgetmi_jax.runs import compare, setup
from forgetmi_jax.unlearning import registry


def test_lr_grid_and_selection():
  assert compare.lr_grid(1e-4, (3.0, 0.3, 1.0)) == pytest.approx([3e-5, 1e-4, 3e-4])
  with pytest.raises(ValueError):
    compare.lr_grid(0.0, (1.0,))
  records = [{'lr': 1.0, 'val_gap': 0.2, 'epochs_run': 1},
             {'lr': 2.0, 'val_gap': 0.05, 'epochs_run': 9},
             {'lr': 3.0, 'val_gap': None, 'epochs_run': 1},
             {'lr': 4.0, 'val_gap': 0.05, 'epochs_run': 9},
             {'lr': 5.0, 'val_gap': 0.058, 'epochs_run': 2}]
  assert compare.select(records)['lr'] == 2.0  # lowest gap; ties -> the first (lower lr)
  assert compare.select(records, tolerance=0.01)['lr'] == 5.0  # as good, and 2 epochs not 9
  assert compare.select(records, tolerance=0.2)['lr'] == 1.0
  assert compare.select([{'lr': 1.0, 'val_gap': None}])['lr'] == 1.0


def test_orderings_on_the_paper_table():
  paper = PAPER_TABLE1[0.10]
  order = compare.orderings(paper, paper, registry.names())['paper']
  assert order['lowest_mia'] == ['forgetmi'] and order['lowest_forget_f1'] == ['forgetmi']
  tied = {'retrain': {'mia': 0.2}, 'scrub': {'mia': 1.0}, 'cf_k': {'mia': 1.0}}
  assert compare.orderings(tied, {}, registry.names())['ours']['lowest_mia'] == ['scrub', 'cf_k']
  # At 10 % EU-k is (just) closest to retrain on average in the paper, Forget-MI next.
  assert order['by_avg_gap'][:2] == ['eu_k', 'forgetmi'] and len(order['by_avg_gap']) == 6
  # The paper's side ranks the paper's own rows, whatever our methods are called (the
  # comparison's baselines are `<name>_eqtime`), and its Forget-MI is the paper's method.
  paper_03 = compare.orderings(paper, PAPER_TABLE1[0.03], ('scrub_eqtime', 'forgetmi'))['paper']
  assert sorted(paper_03['by_avg_gap']) == sorted(set(PAPER_TABLE1[0.03]) - {'original', 'retrain'})
  assert len(paper_03['by_avg_gap']) == 6
  assert paper_03['by_avg_gap'].index('forgetmi') < paper_03['by_avg_gap'].index('scrub')
  assert report.paper_display_name('forgetmi') == registry.label('forgetmi_paper')
  assert report.paper_display_name('scrub') == registry.label('scrub')


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('compare')
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'run')
    config.cache_dir = str(root / 'cache')
    config.num_seeds = 2
  payload = compare.run_comparison(config, 'compare_smoke')
  return root, payload


def test_smoke_comparison_over_two_seeds(smoke_run):
  root, payload = smoke_run
  with open(root / 'run' / 'comparison.json') as f:
    saved = json.load(f)
  assert saved['seeds'] == 2
  names = ['original', 'retrain'] + list(registry.names())
  assert list(saved['summary']) == names
  for name in names:
    s = saved['summary'][name]
    n = 1 if name == 'original' else 2
    for k in ('mia', 'forget_auc', 'forget_f1', 'test_auc', 'test_f1', 'distance_to_retrain',
              'avg_gap'):
      assert len(s[k]['values']) == n, (name, k)
    # seed 0's values are the single-seed table's (gaps aside: those use the mean retrain)
    assert s['mia']['values'][0] == saved['models'][name]['mia']
    assert s['mia']['mean'] == pytest.approx(np.mean(s['mia']['values']))
    if n == 2 and None not in s['test_f1']['values']:
      lo, hi = s['test_f1']['ci95']
      assert lo <= s['test_f1']['mean'] <= hi
  for name in registry.names():  # the retrain-distribution metrics, per example and patient
    for k in ('klom_p95_forget', 'klom_p95_retain', 'klom_p95_test', 'eps_score', 'ulira_auc',
              'ulira_tpr_at_1pct_fpr', 'ulira_tpr_at_5pct_fpr', 'klom_p95_forget_patient',
              'eps_score_patient', 'ulira_auc_patient', 'ulira_tpr_at_1pct_fpr_patient'):
      assert k in saved['summary'][name], (name, k)
    assert saved['summary'][name]['klom_p95_forget'] >= 0
    # two models per side are no distribution for the attack and the epsilon buckets:
    # null (a logged warning), not a number
    assert saved['summary'][name]['ulira_auc'] is None
  # two retrained models: each against the other is the noise floor (> 0: seeds differ)
  floor = saved['summary']['retrain']['avg_gap']['values']
  assert floor[0] == pytest.approx(floor[1]) and floor[0] > 0
  md = (root / 'run' / 'comparison.md').read_text()
  assert 'Over 2 seeds (mean ± 95 % CI)' in md and 'noise floor' in md
  assert (root / 'run' / 'retrain_distribution.png').stat().st_size > 10000
  with np.load(root / 'run' / 'distributional.npz') as z:
    assert z['forgetmi/klom_forget'].shape == (saved['models']['forgetmi']['n_forget'],)


def test_smoke_comparison_writes_all_models(smoke_run):
  root, payload = smoke_run
  with open(root / 'run' / 'comparison.json') as f:
    saved = json.load(f)
  assert list(saved['models']) == ['original', 'retrain'] + list(registry.names())
  for name, m in saved['models'].items():
    for k in ('mia', 'forget_auc', 'forget_f1', 'test_auc', 'test_f1', 'avg_gap', 'seconds'):
      assert k in m, (name, k)
    assert m['seconds'] is not None and m['seconds'] > 0
  assert saved['models']['retrain']['avg_gap'] == 0
  assert saved['tuning']['enabled'] is False
  assert saved['paper']['fraction'] == 0.10
  assert set(saved['history']) == set(registry.names())
  assert [h['epoch'] for h in saved['history']['scrub']] == [0, 1]
  md = (root / 'run' / 'comparison.md').read_text()
  for title in ('Forget-MI', 'NegGrad+', 'SCRUB', 'CF-k', 'EU-k', 'MultiDelete',
                'Paper, Table 1', 'Ordering'):
    assert title in md
  # when and on what each row's seconds were timed: the cached models' own training runs
  timing = saved['timing']
  this_run = datetime.datetime.fromisoformat(timing['this_run']['at'])
  assert len(timing['retrain']) == 2 and timing['original'] is not None
  for stamp in [timing['original']] + timing['retrain']:
    assert datetime.datetime.fromisoformat(stamp['at']) <= this_run
    assert stamp['devices'] == f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  assert timing['retrain'][0] == timing['retrain'][1]  # stacked: trained, and timed, together
  assert f"the retrained models when trained, {timing['retrain'][0]['at']}" in md


def test_tuning_selects_from_the_grid_and_reruns_reuse(smoke_run):
  root, first = smoke_run
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'tuned')
    config.cache_dir = str(root / 'cache')  # original / retrain come from the cache
    config.compare.methods = ('cf_k',)
    config.compare.tune = True
    config.compare.lr_factors = (0.1, 10.0)
  payload = compare.run_comparison(copy_config(config), 'compare_tuned')
  t = payload['tuning']['methods']['cf_k']
  preset = float(config.cf_k.lr)
  assert [r['lr'] for r in t['records']] == pytest.approx([preset * 0.1, preset * 10])
  best = compare.select(t['records'], config.compare.gap_tolerance)
  assert min(r['val_gap'] for r in t['records']) >= best['val_gap'] - 0.01
  assert t['selected_lr'] == best['lr'] == payload['models']['cf_k']['lr']
  assert all(r['stop_epoch'] is not None and r['stop_epoch'] >= -1 for r in t['records'])
  assert set(payload['models']) == {'original', 'retrain', 'cf_k'}
  # Cached models: the same original as the first run, and its training time is kept.
  assert payload['models']['original']['seconds'] == first['models']['original']['seconds']
  # A rerun reloads every finished unlearning run and reports the time it first took.
  again = compare.run_comparison(copy_config(config), 'compare_tuned')
  assert again['models']['cf_k']['seconds'] == payload['models']['cf_k']['seconds']
  assert again['models']['cf_k']['test_f1'] == payload['models']['cf_k']['test_f1']
  assert os.path.exists(root / 'tuned' / 'comparison.md')


def test_tuning_over_seeds_averages_each_trials_gap(smoke_run, monkeypatch):
  """compare.tune_seeds=0: every lr runs on every seed (one stacked program, lr-major), and a
  trial's validation gap is the mean of its seeds' gaps; the rule selects on that mean."""
  root, _ = smoke_run
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'tune_seeds')
    config.cache_dir = str(root / 'cache')
    config.num_seeds = 2
    config.compare.tune_seeds = 0
    config.compare.lr_factors = (0.1, 10.0)
  runs = []
  real = compare.run_or_reuse

  def spy(prep, original, name, tag, *a, copies=None, **k):
    runs.append([(c.seed, float(c.cfg.lr)) for c in copies])
    return real(prep, original, name, tag, *a, copies=copies, **k)
  monkeypatch.setattr(compare, 'run_or_reuse', spy)
  prep = setup.prepare(config, 'tune_seeds')
  (original,), _ = setup.train_or_load(prep, 'original')
  t = compare.tune(prep, original, 'cf_k', config.compare)
  lo, hi = (float(config.cf_k.lr) * f for f in (0.1, 10.0))
  assert runs == [[(0, pytest.approx(lo)), (1, pytest.approx(lo)), (0, pytest.approx(hi)),
                   (1, pytest.approx(hi))]]
  assert t['seeds'] == [0, 1]
  for r in t['records']:
    assert len(r['val_gaps']) == 2 and len(r['stop_epoch']) == 2
    assert r['val_gap'] == pytest.approx((r['val_gaps'][0] + r['val_gaps'][1]) / 2)
  assert t['selected_lr'] == compare.select(t['records'], config.compare.gap_tolerance)['lr']
  # The seeds' gaps differ (their data orders and dropout do), so the mean is not seed 0's.
  assert any(r['val_gaps'][0] != r['val_gaps'][1] for r in t['records'])
  with config.unlocked():
    config.compare.tune_seeds = 3
  with pytest.raises(ValueError, match='compare.tune_seeds'):
    compare.tuning_seeds(config)


def test_fixed_schedule_is_the_median_stopping_epoch_plus_one():
  """Hand-worked: epochs count from 0, so a run stopped at epoch e trained e + 1 epochs; over
  seeds the median, rounded up; -1 (the start kept) trains none; no repair, no repair epochs."""
  assert compare.fixed_schedule({'stop_epoch': [1, 1, 1], 'repair_epoch': [4, 4, 5]}) == {
      'epochs': 2, 'repair_epochs': 5}
  assert compare.fixed_schedule({'stop_epoch': [3, 5, 4], 'repair_epoch': [5, 2, 1]}) == {
      'epochs': 5, 'repair_epochs': 3}
  assert compare.fixed_schedule({'stop_epoch': [1, 2], 'repair_epoch': [None, None]}) == {
      'epochs': 3, 'repair_epochs': 0}  # median 1.5 -> 2 -> 3 epochs
  assert compare.fixed_schedule({'stop_epoch': [-1, -1, 0], 'repair_epoch': [-1, 0, 0]}) == {
      'epochs': 0, 'repair_epochs': 1}
  assert compare.fixed_schedule({'stop_epoch': 6}) == {'epochs': 7, 'repair_epochs': 0}
  assert compare.fixed_schedule({'stop_epoch': None}) is None  # ran without the rule
  config = compare_10pct.get_config('smoke')
  fixed = compare.with_schedule(config, 'forgetmi', {'epochs': 2, 'repair_epochs': 5})
  assert fixed.forgetmi.fixed_schedule and fixed.forgetmi.epochs == 2
  assert fixed.forgetmi.repair.epochs == 5
  assert not config.forgetmi.fixed_schedule and config.forgetmi.repair.epochs == 0  # a copy
  assert compare.with_schedule(config, 'scrub', {'epochs': 3, 'repair_epochs': 0}).scrub.epochs == 3


def test_final_runs_train_the_selected_schedule_unscored(smoke_run):
  """compare.final_schedule: the final runs train exactly the epochs the selected trial
  stopped at (push and repair), with no validation score and no patience epochs."""
  root, _ = smoke_run
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'schedule')
    config.cache_dir = str(root / 'cache')
    config.compare.methods = ('forgetmi',)
    config.compare.tune = True
    config.compare.equal_time = False
    config.compare.lr_factors = (1.0, 10.0)
    config.compare.final_schedule = True
    config.forgetmi.epochs = 4
    config.forgetmi.repair.epochs = 3
    config.forgetmi.repair.retain_examples = 32
  payload = compare.run_comparison(copy_config(config), 'compare_schedule')
  t = payload['tuning']['methods']['forgetmi']
  best = next(r for r in t['records'] if r['lr'] == t['selected_lr'])
  schedule = compare.fixed_schedule(best)
  assert t['schedule'] == schedule
  history = payload['history']['forgetmi']
  push = [h for h in history if h.get('phase') != 'repair']
  repair = [h for h in history if h.get('phase') == 'repair']
  assert [h['epoch'] for h in push] == list(range(schedule['epochs']))
  assert [h['epoch'] for h in repair] == list(range(schedule['repair_epochs']))
  assert all('val_gap' not in h for h in history)  # nothing scored
  assert payload['stopping']['methods']['forgetmi'] == [None] * payload['seeds']  # no rule
  md = (root / 'schedule' / 'comparison.md').read_text()
  assert compare.schedule_text(schedule) in md
  assert compare.schedule_text({'epochs': 2, 'repair_epochs': 5}) == (
      'tuned schedule: 2 epochs + repair 5')
  assert compare.schedule_text(None) == 'fixed schedule'


def test_budgeted_trials_count_only_what_the_final_run_trains(smoke_run, monkeypatch):
  """Under compare.final_schedule the final runs score nothing, so an example budget's lr
  trials count only their training (stop.scores_in_budget off for them); without a budget or
  without final schedules the trials run as before. The default hashes as before the option
  existed (earlier runs still resume); off, the rule's scores cost the budget nothing."""
  root, _ = smoke_run
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.workdir = str(root / 'budget_scores')
    config.cache_dir = str(root / 'cache')
    config.compare.tune = True
  prep = setup.prepare(config, 'budget_scores')
  seen = []

  class Enough(Exception):
    pass

  def spy(p, *a, **k):
    seen.append(p.config.stop.scores_in_budget)
    raise Enough
  monkeypatch.setattr(compare, 'run_or_reuse', spy)
  for budget, final_schedule in ((0.2, True), (0.0, True), (0.2, False)):
    cc = copy_config(config.compare)
    with cc.unlocked():
      cc.final_schedule = final_schedule
    p = dataclasses.replace(prep, config=copy_config(config))
    with p.config.unlocked():
      p.config.forgetmi.budget = budget
    with pytest.raises(Enough):
      compare.tune(p, None, 'forgetmi', cc)
  assert seen == [False, True, True]
  assert prep.config.stop.scores_in_budget  # the caller's config is untouched

  def key(scores_in_budget):
    c = copy_config(config)
    with c.unlocked():
      if scores_in_budget is None:
        del c.stop['scores_in_budget']
      else:
        c.stop.scores_in_budget = scores_in_budget
    copies = setup.copies_of(c, 'forgetmi', [0])
    return setup.run_fingerprint(dataclasses.replace(prep, config=c), 'forgetmi', copies)[0]
  assert key(True) == key(None) != key(False)
  original = prep.init_variables(0)
  free = dataclasses.replace(prep, config=copy_config(config))
  with free.config.unlocked():
    free.config.stop.scores_in_budget = False
  assert setup.stopping_rule(prep, original, 'forgetmi').score_rows > 0
  assert setup.stopping_rule(free, original, 'forgetmi').score_rows == 0


def test_mean_record_marks_a_diverged_seed():
  a = {'val_gap': 0.1, 'epochs_run': 2, 'stop_epoch': 1,
       **{k: 0.5 for k in compare.TRIAL_SCORES}}
  b = dict(a, val_gap=None, epochs_run=4, stop_epoch=3)
  assert compare.mean_record([a]) == a
  m = compare.mean_record([a, b])
  assert m['val_gap'] is None and m['epochs_run'] == 3.0 and m['stop_epoch'] == [1, 3]
  assert m['val_gaps'] == [0.1, None]
  assert compare.select([{'lr': 1.0, **m}, {'lr': 2.0, **a}])['lr'] == 2.0


def test_tuning_reads_no_test_label_and_no_retrained_model(smoke_run, monkeypatch):
  """The rule's choices (lr, stopping epochs, scores) are unchanged when every test label is
  shuffled and no retrained model exists (loading one raises)."""
  root, _ = smoke_run
  config = compare_10pct.get_config('smoke')
  with config.unlocked():
    config.cache_dir = str(root / 'cache')
    config.compare.tune = True
    config.compare.lr_factors = (0.3, 3.0)
    config.forgetmi.repair.epochs = 1  # Forget-MI+'s repair phase reads no test data either
    config.forgetmi.repair.retain_examples = 32
  cc = config.compare
  methods = ('forgetmi', 'neggrad_plus')

  def choose(workdir, shuffle):
    c = copy_config(config)
    with c.unlocked():
      c.workdir = str(root / workdir)
    prep = setup.prepare(c, workdir)
    (original,), _ = setup.train_or_load(prep, 'original')
    if shuffle:
      labels = np.asarray(prep.cohort.labels).copy()
      test = prep.split.test_idx
      labels[test] = np.random.default_rng(0).permutation(labels[test])[::-1]
      assert (labels[test] != np.asarray(prep.cohort.labels)[test]).any()
      cohort = dataclasses.replace(prep.cohort, labels=labels)
      source = ExampleSource(cohort, prep.source.input_ids, prep.source.attention_mask)
      prep = dataclasses.replace(prep, cohort=cohort, source=source)
    return compare.select_settings(prep, original, methods, cc)

  lrs, tuning = choose('oracle_a', shuffle=False)
  real_load = setup.train_or_load

  def no_retrain(prep, kind, *a, **k):
    if kind == 'retrain':
      raise AssertionError('the tuning rule asked for a retrained model')
    return real_load(prep, kind, *a, **k)
  monkeypatch.setattr(setup, 'train_or_load', no_retrain)
  lrs_b, tuning_b = choose('oracle_b', shuffle=True)
  assert lrs == lrs_b
  for name in methods:
    strip = lambda t: [{k: v for k, v in r.items() if k != 'seconds'} for r in t['records']]  # noqa
    assert strip(tuning[name]) == strip(tuning_b[name])
    # the final runs' fixed schedule (compare.final_schedule) comes from the same records
    assert tuning[name]['schedule'] == tuning_b[name]['schedule'] is not None


def copy_config(config):
  import copy
  return copy.deepcopy(config)
