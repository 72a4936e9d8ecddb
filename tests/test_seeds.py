"""Results over seeds: intervals against scipy and a hand-worked case, gaps against the mean of
the retrained models and the retrain row's noise floor, and the cache of retrained models that
trains only the seeds it lacks."""
import jax
import numpy as np
import pytest
from scipy import stats

from forgetmi_jax import config as config_lib
from forgetmi_jax.evaluation import distance, seeds
from forgetmi_jax.runs import setup
from tests.helpers import tiny_config


def test_interval_matches_scipy_and_a_hand_worked_case():
  # [1..5]: mean 3, s = sqrt(2.5), sem = s / sqrt(5) = 0.70711, t(0.975, 4) = 2.776445
  s = seeds.interval([1.0, 2.0, 3.0, 4.0, 5.0])
  assert s['mean'] == 3.0
  assert s['ci95'] == pytest.approx([3 - 2.776445 * 0.707107, 3 + 2.776445 * 0.707107], abs=1e-5)
  x = np.array([0.81, 0.74, 0.9, 0.66, 0.79, 0.85, 0.7])
  ci = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)  # another scipy route to it
  assert seeds.interval(x)['ci95'] == pytest.approx([ci.low, ci.high], rel=1e-12)
  assert seeds.interval(list(x))['values'] == pytest.approx(list(x))
  # one value has no interval; equal values a zero-width one; nan/None are left out
  assert seeds.interval([0.5])['ci95'] is None and seeds.interval([0.5])['mean'] == 0.5
  assert seeds.interval([0.2, 0.2, 0.2])['ci95'] == pytest.approx([0.2, 0.2], abs=1e-15)
  s = seeds.interval([1.0, None, float('nan'), 3.0])
  assert s['mean'] == 2.0 and s['values'] == [1.0, None, None, 3.0]
  assert seeds.format_interval(seeds.interval([1.0, 3.0])) == f"2.000 ± {12.7062 * 1:.3f}"
  assert seeds.format_interval(seeds.interval([0.25])) == '0.250'
  assert seeds.format_interval(None) == '—'


def _metrics(mia, forget_f1):
  return {'mia': mia, 'forget_auc': 0.7, 'forget_f1': forget_f1, 'test_auc': 0.7,
          'test_f1': 0.4, 'seconds': 10.0}


def test_gaps_against_the_mean_of_retrains_and_the_noise_floor():
  rng = np.random.default_rng(0)
  logits = {'retrain': [rng.normal(size=(6, 4)) for _ in range(3)],
            'm': [rng.normal(size=(6, 4)) for _ in range(2)]}
  per_seed = {'retrain': [_metrics(0.5, 0.40), _metrics(0.6, 0.46), _metrics(0.7, 0.43)],
              'm': [_metrics(0.9, 0.6), _metrics(0.8, 0.5)]}
  out = seeds.summarize(per_seed, logits)
  # run i vs the mean of all retrains (mia 0.6, forget F1 0.43); three other metrics equal
  gaps_m = [(0.3 + 0.17) / 5, (0.2 + 0.07) / 5]
  assert out['m']['avg_gap']['values'] == pytest.approx(gaps_m)
  assert out['m']['gap_mia']['values'] == pytest.approx([0.3, 0.2])
  # retrain i vs the mean of the others: (0.65, 0.445), (0.6, 0.415), (0.55, 0.43)
  floor = [(0.15 + 0.045) / 5, (0.0 + 0.045) / 5, (0.15 + 0.0) / 5]
  assert out['retrain']['avg_gap']['values'] == pytest.approx(floor)
  assert out['retrain']['avg_gap']['mean'] == pytest.approx(np.mean(floor))
  # distance: mean over the retrained models (over the others for a retrained model)
  d = np.mean([distance.distance_to_retrain(logits['m'][1], r) for r in logits['retrain']])
  assert out['m']['distance_to_retrain']['values'][1] == pytest.approx(d)
  d0 = np.mean([distance.distance_to_retrain(logits['retrain'][0], r)
                for r in logits['retrain'][1:]])
  assert out['retrain']['distance_to_retrain']['values'][0] == pytest.approx(d0)
  assert out['m']['mia']['values'] == [0.9, 0.8]
  assert out['m']['seconds']['mean'] == 10.0
  # one retrained model: nothing to hold it against, so no floor (None, not 0)
  one = seeds.summarize({'retrain': per_seed['retrain'][:1]}, {'retrain': logits['retrain'][:1]})
  assert one['retrain']['avg_gap']['mean'] is None


def test_seeds_of_a_config_and_validation(tmp_path):
  c = tiny_config(tmp_path, seed=3, num_seeds=4)
  assert config_lib.seeds(c) == [3, 4, 5, 6]
  with pytest.raises(ValueError, match='num_seeds=0'):
    config_lib.validate(tiny_config(tmp_path, num_seeds=0))


def test_the_cache_trains_only_the_seeds_it_lacks(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, **{'train.epochs': 1})
  prep = setup.prepare(config)
  trained = []
  real = setup._train

  def recording(prep_, kind, indices, seeds_, paths, group):
    trained.append(list(seeds_))
    return real(prep_, kind, indices, seeds_, paths, group)
  monkeypatch.setattr(setup, '_train', recording)
  first, _ = setup.train_or_load(prep, 'retrain', seeds=[0, 1])
  again, seconds = setup.train_or_load(prep, 'retrain', seeds=[0, 1, 2])
  assert trained == [[0, 1], [2]]
  for a, b in zip(first, again[:2]):  # seeds 0 and 1 are the cached models, bit for bit
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert len(again) == 3 and all(s > 0 for s in seconds)
  assert not np.array_equal(jax.tree.leaves(again[1])[0], jax.tree.leaves(again[2])[0])


def test_unlearn_over_two_seeds_and_reevaluate_chunked_copies(tmp_path):
  """The main command with num_seeds=2, its two Forget-MI copies run one per program (two
  checkpoint chunks): the summary holds both seeds, and re-evaluating the saved checkpoints
  gives the same numbers."""
  from forgetmi_jax.runs import unlearn
  config = tiny_config(tmp_path / 'a', num_seeds=2, copies_per_program=1,
                       **{'train.epochs': 1, 'stop.rule': 'none'})  # both seeds must move
  first = unlearn.run(config)
  assert first['seeds'] == 2
  ckpt = tmp_path / 'a' / 'checkpoints' / 'forgetmi' / first['fingerprint']['forgetmi']
  assert sorted(p.name for p in ckpt.glob('chunk*')) == ['chunk0-of-2', 'chunk1-of-2']
  s = first['summary']
  assert len(s['forgetmi']['forget_f1']['values']) == 2 and len(s['original']['mia']['values']) == 1
  assert s['forgetmi']['mia']['values'][0] == first['models']['forgetmi']['mia']
  assert s['forgetmi']['forget_f1']['values'][0] != s['forgetmi']['forget_f1']['values'][1] or \
      s['forgetmi']['test_auc']['values'][0] != s['forgetmi']['test_auc']['values'][1]
  again = unlearn.reevaluate(str(tmp_path / 'a'))
  for name in ('original', 'retrain', 'forgetmi'):
    for k in ('mia', 'forget_auc', 'test_f1', 'avg_gap', 'seconds'):
      assert again['summary'][name][k]['values'] == s[name][k]['values'], (name, k)
  assert 'Over 2 seeds' in (tmp_path / 'a' / 'report.md').read_text()
