"""A run's metrics, assembled once for every runner: per model, the paper's table columns
(REFERENCE 5), the stronger attacks, the gaps to the retrained model, and per-example losses;
over seeds, their means and intervals and the retrain-distribution metrics."""
import logging

import numpy as np

from forgetmi_jax.evaluation import distance, distributional, gaps, metrics, mia, seeds
from forgetmi_jax.evaluation.evaluator import make_predict_fn, predict_logits


def model_logits(model, source, split, models: dict, eval_cfg):
  """{model: {set: logits}} on the retain, test and forget sets (eval mode)."""
  predict = make_predict_fn(model.apply, eval_cfg.head)
  sets = {'retain': split.retain_idx, 'test': split.test_idx, 'forget': split.forget_idx}
  return {name: {s: predict_logits(predict, variables, source, idx, int(eval_cfg.batch_size),
                                   desc=f'eval {name}/{s}') for s, idx in sets.items()}
          for name, variables in models.items()}


def evaluate_models(model, source, split, models: dict, seconds: dict, eval_cfg,
                    return_logits=False):
  """(results {model: metrics}, losses {model: {set: per-example CE}}[, logits]) for `models`
  ({name: {'params', 'batch_stats'}}); gaps are added when 'retrain' is among them."""
  labels = np.asarray(source.labels)
  sets = {'retain': split.retain_idx, 'test': split.test_idx, 'forget': split.forget_idx}
  logits = model_logits(model, source, split, models, eval_cfg)
  results, losses = {}, {}
  seed = int(eval_cfg.mia_seed)
  for name, lg in logits.items():
    loss = {s: metrics.per_sample_ce(lg[s], labels[sets[s]]) for s in sets}
    losses[name] = loss
    forget = metrics.classification_metrics(lg['forget'], labels[sets['forget']],
                                            name=f'{name} (forget)')
    test = metrics.classification_metrics(lg['test'], labels[sets['test']], name=f'{name} (test)')
    accuracy = {s: float(np.mean(np.argmax(lg[s], -1) == labels[sets[s]])) for s in sets}
    svc = mia.svc_mia(loss['retain'], loss['test'], loss['forget'], seed=seed,
                      return_details=True, name=name)
    m = {
        'mia': svc['score'],
        # the attack's own member rates: a retrained model's score sits near its test rate
        'mia_retain_member_rate': svc['retain_member_rate'],
        'mia_test_member_rate': svc['test_member_rate'],
        'n_retain': int(len(sets['retain'])), 'n_test': int(len(sets['test'])),
        'n_forget': int(len(sets['forget'])),
        'forget_auc': forget['auc'], 'forget_f1': forget['f1'],
        'test_auc': test['auc'], 'test_f1': test['f1'],
        'distance_to_retrain': (distance.distance_to_retrain(lg['retain'],
                                                             logits['retrain']['retain'],
                                                             name=name)
                                if 'retrain' in logits else None),
        'seconds': seconds.get(name),
        # top-1 accuracies: the competition score's utility ratios (RA, TA)
        'retain_acc': accuracy['retain'], 'test_acc': accuracy['test'],
    }
    strong = mia.logreg_mia(loss['retain'], loss['test'], loss['forget'], seed=seed, name=name)
    m['mia_logreg_member_rate'] = strong['forget_member_rate']
    m['mia_logreg_forget_vs_test_auc'] = strong['forget_vs_test_auc']
    if eval_cfg.mia_per_batch_mean:
      m['mia_per_batch'] = mia.svc_mia(loss['retain'], loss['test'], loss['forget'], seed=seed,
                                       per_batch_mean=True, name=name)
    results[name] = m
  if 'retrain' in results:
    results = gaps.add_gaps(results)
  if return_logits:
    return results, losses, logits
  return results, losses


# ------------------------------------------------------------------------------ over seeds
def run_key(name, i):
  """Seed i's model name in the flat results: seed 0 keeps the name, the others `name@i`."""
  return name if i == 0 else f'{name}@{i}'


def evaluate_runs(model, source, split, runs: dict, seconds: dict, eval_cfg, subject_id,
                  retrain_key='retrain'):
  """Every seed of every model, then what the seeds say together.

  `runs`: {name: [variables per seed]} (the original: one), `seconds`: {name: [per seed]},
  `subject_id`: the cohort's patient id per image (for the patient-level metrics).
  Returns (results, losses, logits, summary, per_example): the first three flat over
  `run_key(name, i)` as `evaluate_models` gives them (seed 0's rows are the single-seed
  run's); `summary` {name: {metric: interval or number}}; `per_example` {name: arrays} of the
  distributional metrics (for the figure and distributional.npz; never in a JSON report).
  """
  flat = {run_key(n, i): v for n, vs in runs.items() for i, v in enumerate(vs)}
  flat_seconds = {run_key(n, i): t for n, ts in seconds.items() for i, t in enumerate(ts)}
  results, losses, logits = evaluate_models(model, source, split, flat, flat_seconds, eval_cfg,
                                            return_logits=True)
  per_seed = {n: [results[run_key(n, i)] for i in range(len(vs))] for n, vs in runs.items()}
  retain_logits = {n: [logits[run_key(n, i)]['retain'] for i in range(len(vs))]
                   for n, vs in runs.items()}
  summary = seeds.summarize(per_seed, retain_logits, retrain_key)
  per_example = {}
  retrains = runs.get(retrain_key, [])
  labels = np.asarray(source.labels)
  sets = {'retain': split.retain_idx, 'test': split.test_idx, 'forget': split.forget_idx}
  groups = np.asarray(subject_id)[split.forget_idx]

  def margins_of(who, n):  # {set: [n models, examples]}
    return {s: np.stack([distributional.margins(logits[run_key(who, i)][s], labels[idx])
                         for i in range(n)]) for s, idx in sets.items()}
  methods = [n for n, vs in runs.items()
             if n not in ('original', retrain_key) and len(vs) >= 2 and len(retrains) >= 2]
  retrained = margins_of(retrain_key, len(retrains)) if methods else None
  mean_acc = lambda n, k: float(summary[n][k]['mean'])  # noqa: E731
  for name in methods:
    unlearned = margins_of(name, len(runs[name]))
    summary[name].update(distributional.summarize(
        unlearned, retrained, groups,
        retain_acc=mean_acc(name, 'retain_acc'), test_acc=mean_acc(name, 'test_acc'),
        retain_acc_retrain=mean_acc(retrain_key, 'retain_acc'),
        test_acc_retrain=mean_acc(retrain_key, 'test_acc')))
    klom_forget = distributional.klom(unlearned['forget'], retrained['forget'])
    per_example[name] = {
        'klom_forget': klom_forget,
        'klom_forget_patient': distributional.patient_max(klom_forget, groups)[1],
        'epsilon_forget': distributional.per_example_epsilon(unlearned['forget'],
                                                             retrained['forget'])}
  if methods:
    summary[retrain_key].update(null_distributional(
        retrained, groups, max(len(runs[n]) for n in methods), seed=int(eval_cfg.mia_seed)))
  if len(retrains) < 2 and len(runs) > 2:
    logging.getLogger('forgetmi_jax').info(
        'one retrained model: no noise floor and no retrain-distribution metrics (num_seeds=1)')
  return results, losses, logits, summary, per_example


def null_distributional(retrain_margins, forget_groups, n_models, seed=0):
  """The retrain-distribution metrics when the unlearned models ARE retrained ones: per
  example, two independent sets of `n_models` margins drawn from a normal fitted to the
  retrained models' margins, scored as a method is. With a handful of seeds these estimators
  sit far from their ideal values (KLoM's 20 bins need many models), so this simulated chance
  level, at the run's own N, is what a method's numbers are read against."""
  rng = np.random.default_rng(seed)
  mean = {s: m.mean(0) for s, m in retrain_margins.items()}
  std = {s: m.std(0, ddof=1) for s, m in retrain_margins.items()}
  draw = lambda: {s: rng.normal(mean[s], std[s], size=(n_models,) + mean[s].shape)  # noqa
                  for s in retrain_margins}
  return distributional.summarize(draw(), draw(), forget_groups, retain_acc=1.0,
                                  retain_acc_retrain=1.0, test_acc=1.0, test_acc_retrain=1.0)
