"""A run's metrics, assembled once for every runner: per model, the paper's table columns
(REFERENCE 5), the stronger attacks, the gaps to the retrained model, and per-example losses."""
import numpy as np

from forgetmi_jax.evaluation import distance, gaps, metrics, mia
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
