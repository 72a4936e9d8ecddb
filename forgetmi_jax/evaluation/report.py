"""Reports: metrics.json <-> report.md, the paper's Table 1 beside ours, and Fig. 3 histograms.

metrics.json (the project's output contract; change only additively):
  {"forget_fraction": f,
   "models": {"original": M, "retrain": M, "forgetmi": M, ...},
   "config": {...}}
  M = {"mia", "forget_auc", "forget_f1", "test_auc", "test_f1", "distance_to_retrain",
       "seconds"} plus optional extras (e.g. "mia_logreg": {...}, "mia_per_batch", gap_*).
Missing values are null in JSON and '—' in markdown. Reports hold aggregate numbers only:
never report text, pixels or per-patient values.
"""
import json
import math
import numbers
import os

import numpy as np

from forgetmi_jax.evaluation.gaps import METRIC_KEYS, retrain_gaps
from forgetmi_jax.evaluation.seeds import format_interval
from forgetmi_jax.io_utils import atomic_write
from forgetmi_jax.unlearning import registry

MISSING = '—'
STANDARD_KEYS = METRIC_KEYS + ('distance_to_retrain', 'seconds')
GAP_KEYS = tuple(f'gap_{k}' for k in METRIC_KEYS) + ('avg_gap',)


# Table 1 of Hardan et al. (2025), transcribed from REFERENCE 6: per method, for 3 % / 6 % /
# 10 % forget sets, MIA, forget AUC, forget F1, test AUC, test F1.
_PAPER_TABLE1_TEXT = """
original     1.000 .999 .965 .677 .388 | 1.000 .999 .972 .677 .388 | 1.000 .999 .970 .677 .388
retrain      0.000 .566 .310 .626 .362 | 0.769 .675 .395 .702 .427 | 0.190 .588 .342 .629 .382
neggrad_plus 1.000 1.00 .983 .678 .399 | 1.000 1.00 .987 .677 .388 | 1.000 1.00 .986 .677 .388
scrub        1.000 1.00 .983 .679 .397 | 1.000 1.00 .987 .679 .394 | 1.000 1.00 .985 .679 .394
cf_k         1.000 .999 .976 .686 .416 | 1.000 .999 .977 .676 .410 | 1.000 1.00 .990 .668 .410
eu_k         1.000 .996 .952 .669 .386 | 1.000 .612 .328 .631 .339 | 1.000 .629 .345 .631 .339
multidelete  0.806 .858 .562 .622 .300 | 0.846 .878 .604 .636 .289 | 0.952 .972 .783 .656 .333
forgetmi     0.571 .735 .393 .625 .250 | 0.615 .654 .328 .599 .270 | 0.810 .656 .313 .565 .252
"""
PAPER_FRACTIONS = (0.03, 0.06, 0.10)


def _parse_paper_table(text):
  table = {f: {} for f in PAPER_FRACTIONS}
  for line in text.strip().splitlines():
    name, rest = line.split(None, 1)
    for f, cell in zip(PAPER_FRACTIONS, rest.split('|')):
      values = [float(v) for v in cell.split()]
      assert len(values) == len(METRIC_KEYS), line
      table[f][name] = dict(zip(METRIC_KEYS, values))
  return table


PAPER_TABLE1 = _parse_paper_table(_PAPER_TABLE1_TEXT)


# ----------------------------------------------------------------------------- json, files

def _atomic_write(path, data, mode='w'):
  """Readers (and a killed run) see the old file or the new one, never half of it."""
  atomic_write(path, lambda f: f.write(data.encode('utf-8') if 'b' not in mode else data))
  return os.fspath(path)


def to_jsonable(obj):
  """Plain-JSON copy: numpy/jax scalars and arrays -> python, nan/inf -> None, keys -> str."""
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, numbers.Integral):
    return int(obj)
  if isinstance(obj, numbers.Real):
    x = float(obj)
    return x if math.isfinite(x) else None
  if hasattr(obj, 'to_dict') and callable(obj.to_dict):  # ml_collections.ConfigDict
    obj = obj.to_dict()
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, set, frozenset)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, '__array__'):  # np.ndarray, jax.Array, 0-d arrays
    a = np.asarray(obj)
    return to_jsonable(a.item()) if a.ndim == 0 else to_jsonable(a.tolist())
  return str(obj)


def write_json_atomic(obj, path, indent=2):
  """Write `obj` as strict JSON (no NaN tokens) atomically; returns the path."""
  text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + '\n'
  return _atomic_write(path, text)


def read_metrics(path):
  """Load a metrics.json and check the parts the report relies on."""
  with open(path, encoding='utf-8') as f:
    metrics = json.load(f)
  if not isinstance(metrics, dict) or not isinstance(metrics.get('models'), dict):
    raise ValueError(f'{path}: not a metrics.json (needs a "models" object)')
  for name, m in metrics['models'].items():
    if not isinstance(m, dict):
      raise ValueError(f'{path}: models.{name} must be an object')
  return metrics


# ----------------------------------------------------------------------------- markdown

def _finite_number(v):
  return (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
          and math.isfinite(float(v)))


def format_value(v, digits=3):
  """Cell text: floats to `digits` decimals, None/nan -> '—', lists inline, '|' escaped."""
  if v is None:
    return MISSING
  if isinstance(v, (bool, np.bool_)):
    return 'yes' if v else 'no'
  if isinstance(v, numbers.Integral):
    return str(int(v))
  if isinstance(v, numbers.Real):
    x = float(v)
    if math.isnan(x):
      return MISSING
    if math.isinf(x):
      return '∞' if x > 0 else '-∞'
    return f'{x:.{digits}f}'
  if isinstance(v, (list, tuple)):
    return '[' + ', '.join(format_value(x, digits) for x in v) + ']' if v else '[]'
  if isinstance(v, dict):
    v = json.dumps(to_jsonable(v), separators=(',', ':'))
  if hasattr(v, '__array__'):
    a = np.asarray(v)
    return format_value(a.item() if a.ndim == 0 else a.tolist(), digits)
  return str(v).replace('|', '\\|').replace('\n', ' ')


def _is_numeric_cell(v):
  return _finite_number(v) or v is None or (isinstance(v, float) and math.isnan(v))


def markdown_table(headers, rows, digits=3, align=None):
  """A GitHub markdown table; floats to `digits` decimals, None/nan as '—'.

  `align`: one of 'l'/'r'/'c' per column; by default columns whose cells are all numbers
  (or missing) are right-aligned, others left-aligned.
  """
  headers = list(headers)
  rows = [list(r) for r in rows]
  for r in rows:
    if len(r) != len(headers):
      raise ValueError(f'row has {len(r)} cells, expected {len(headers)}: {r!r}')
  if align is None:
    align = []
    for j in range(len(headers)):
      col = [r[j] for r in rows]
      numeric = bool(col) and all(_is_numeric_cell(v) for v in col) and any(
          _finite_number(v) for v in col)
      align.append('r' if numeric else 'l')
  marks = {'l': ':---', 'r': '---:', 'c': ':---:'}
  out = ['| ' + ' | '.join(format_value(h, digits) for h in headers) + ' |',
         '| ' + ' | '.join(marks[a] for a in align) + ' |']
  for r in rows:
    out.append('| ' + ' | '.join(format_value(v, digits) for v in r) + ' |')
  return '\n'.join(out) + '\n'


EQUAL_TIME_SUFFIX = '_eqtime'  # a baseline run under Forget-MI+'s wall time (compare.py)


def display_name(key):
  if key.endswith(EQUAL_TIME_SUFFIX):
    return registry.label(key[:-len(EQUAL_TIME_SUFFIX)]) + ' (Forget-MI+ time)'
  return registry.label(key)


def paper_display_name(key):
  """A row of the paper's Table 1: its `forgetmi` is the paper's own method."""
  return display_name('forgetmi_paper' if key == 'forgetmi' else key)


def ordered_models(models):
  """original, retrain, then the others in their given order."""
  first = [k for k in ('original', 'retrain') if k in models]
  return first + [k for k in models if k not in first]


def nearest_paper_fraction(fraction):
  """The paper column (0.03/0.06/0.10) nearest `fraction`; values > 1 are read as percent."""
  f = float(fraction)
  if f > 1:
    f /= 100.0
  return min(PAPER_FRACTIONS, key=lambda p: abs(p - f))


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _seconds(v):
  return f'{float(v):.1f}' if _finite_number(v) else None


def _results_table(models):
  retrain = models.get('retrain')
  rows = []
  for name in ordered_models(models):
    m = models[name]
    if retrain is not None:
      avg_gap = retrain_gaps(m, retrain)['avg_gap']
    else:
      avg_gap = m.get('avg_gap')
    rows.append([display_name(name)] + [m.get(k) for k in METRIC_KEYS] +
                [m.get('distance_to_retrain'), _seconds(m.get('seconds')), avg_gap])
  headers = ['Model', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1',
             'Dist. to retrain', 'Seconds', 'Avg. gap']
  return markdown_table(headers, rows, align=['l'] + ['r'] * 8)


def _paper_table(paper_fraction):
  table = PAPER_TABLE1[paper_fraction]
  rows = []
  for name in ordered_models(table):
    m = table[name]
    rows.append([paper_display_name(name)] + [m[k] for k in METRIC_KEYS] +
                [retrain_gaps(m, table['retrain'])['avg_gap']])
  headers = ['Model (paper)', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1',
             'Avg. gap']
  return markdown_table(headers, rows, align=['l'] + ['r'] * 6)


def _extras_table(models):
  skip = set(STANDARD_KEYS) | set(GAP_KEYS)
  flat = {name: _flatten({k: v for k, v in models[name].items() if k not in skip})
          for name in ordered_models(models)}
  columns = []
  for f in flat.values():
    for k in f:
      if k not in columns:
        columns.append(k)
  if not columns:
    return None
  rows = [[display_name(name)] + [f.get(k) for k in columns] for name, f in flat.items()]
  return markdown_table(['Model'] + columns, rows)


NOTES = """\
- **MIA**: fraction of forget-set samples that an RBF SVC, trained on per-sample losses with
  retain = member and test = non-member, calls "member". Lower = more forgotten, but the target
  is the retrained model's value, not 0.
- **Forget / test AUC, F1**: image-head logits; unweighted mean of one-vs-rest ROC AUCs of the
  softmax, and macro-F1 of the argmax. A class absent from a set is skipped, not scored 0
  (listed under additional metrics when the run records it).
- **Dist. to retrain**: 1 - mean cosine similarity of the image logits with the retrained
  model's, over the retain set (0 = same outputs; lower = closer).
- **Avg. gap**: mean of |model - retrain| over the five metrics (a metric missing on either side
  is left out). Lower = closer to exact unlearning, the goal.
- **Seconds**: wall-clock time of the run that produced the model (training for original and
  retrain, unlearning for the methods). The original and retrained models are usually loaded
  from the cache, so their seconds are those of an earlier run: the "Seconds:" line at the
  top says when and on what each was timed.
- '—' = not available. The paper's numbers come from MIMIC-CXR on a GPU; runs on other data
  (e.g. the synthetic cohort) are comparable in pattern only, not in absolute value.
"""


DISTRIBUTION_COLUMNS = (
    ('klom_p95_forget', 'KLoM p95 forget'), ('klom_p95_retain', 'KLoM p95 retain'),
    ('klom_p95_test', 'KLoM p95 test'), ('eps_score', 'Eps. score'),
    ('ulira_auc', 'U-LiRA AUC'), ('ulira_tpr_at_1pct_fpr', 'TPR@1%'),
    ('ulira_tpr_at_5pct_fpr', 'TPR@5%'))
PATIENT_COLUMNS = (
    ('klom_p95_forget_patient', 'KLoM p95'), ('eps_score_patient', 'Eps. score'),
    ('ulira_auc_patient', 'U-LiRA AUC'), ('ulira_tpr_at_1pct_fpr_patient', 'TPR@1%'),
    ('ulira_tpr_at_5pct_fpr_patient', 'TPR@5%'))

SEED_NOTES = """\
Cells are mean ± half-width of the 95 % t interval over the seeds (scipy.stats.t.interval).
Gaps and distances of a run are taken against the mean of the retrained models; the retrain
row holds each retrained model against the mean of the others: its Avg. gap is the noise floor,
the least any method can be expected to reach. Retrain-distribution metrics (one number per
method from all its seeds and all retrained models; see README "Results over seeds"): KLoM = KL
divergence of each example's margin distribution, unlearned vs retrained (p95 over examples;
0 = indistinguishable); Eps. score = the NeurIPS 2023 unlearning competition's forget quality
times RA/RA_retrain x TA/TA_retrain (1 = best); U-LiRA = a per-example likelihood-ratio attack
telling an unlearned model from a retrained one on forget examples (AUC 0.5 = chance). Patient
level: each forgotten patient counts as exposed as their most exposed image. With a handful of
seeds these estimators sit far from their ideal values even for identical distributions, so read
a method against the chance-level row: the same metrics with both sides drawn, per example, from
a normal fitted to the retrained models' margins, at the run's number of seeds."""


def seed_section(summary, n_seeds):
  """Markdown: mean ± CI per model and metric, then the retrain-distribution metrics."""
  cols = METRIC_KEYS + ('distance_to_retrain', 'avg_gap')
  rows = []
  for name in ordered_models(summary):
    s = summary[name]
    n = len((s.get('mia') or {}).get('values') or [])
    secs = (s.get('seconds') or {}).get('mean')
    rows.append([display_name(name), n] + [format_interval(s.get(k)) for k in cols] +
                [_seconds(secs)])
  headers = ['Model', 'Seeds', 'MIA', 'Forget AUC', 'Forget F1', 'Test AUC', 'Test F1',
             'Dist. to retrain', 'Avg. gap', 'Seconds']
  parts = [f'## Over {n_seeds} seeds (mean ± 95 % CI)',
           markdown_table(headers, rows, align=['l'] + ['r'] * 9)]
  methods = [m for m in ordered_models(summary) if m != 'original'
             and any(k in summary[m] for k, _ in DISTRIBUTION_COLUMNS)]
  if methods:
    label = {m: display_name(m) for m in methods}
    label['retrain'] = 'Chance level (retrained vs retrained, simulated)'

    parts.append('### Against the distribution of retrained models (per example)')
    parts.append(markdown_table(['Method'] + [c for _, c in DISTRIBUTION_COLUMNS],
                                [[label[m]] + [summary[m].get(k) for k, _ in
                                               DISTRIBUTION_COLUMNS] for m in methods]))
    parts.append('### Per forgotten patient (max over their images)')
    parts.append(markdown_table(['Method'] + [c for _, c in PATIENT_COLUMNS],
                                [[label[m]] + [summary[m].get(k) for k, _ in
                                               PATIENT_COLUMNS] for m in methods]))
  parts.append(SEED_NOTES)
  return '\n\n'.join(p.strip('\n') for p in parts) + '\n'


def _stamp(stamp):
  return f"{stamp['at']} on {stamp['devices']} ({stamp['cpus']} CPUs)"


def timing_note(timing):
  """One paragraph saying when and on what each row's seconds were timed, or None. The
  original's and retrained models' seconds are those of the runs that trained them, often
  an earlier run's (the cache), and a ratio of seconds timed apart carries both runs'
  spread."""
  if not timing or not timing.get('this_run'):
    return None
  lines = [f"Seconds: this run's methods timed {_stamp(timing['this_run'])}"]
  for kind, label in (('original', 'original'), ('retrain', 'retrained')):
    stamps = timing.get(kind)
    stamps = stamps if isinstance(stamps, list) else [stamps]
    known = list(dict.fromkeys(_stamp(t) for t in stamps if t))
    models = f'the {label} model{"s" if len(stamps) > 1 else ""} when trained'
    if known:
      lines.append(f'{models}, {"; ".join(known)}')
    elif stamps:
      lines.append(f'{models}, at a time and on hardware not recorded (cached by an earlier '
                   'version)')
  return ('; '.join(lines) + '. One retraining\'s seconds vary by about 10 % between runs '
          'on the same machine, more across machines: a time ratio is only as good as the '
          'two runs it divides, so time them together (benchmarks/bench_final_run.py '
          '--retrain).')


def build_report(metrics, title='Forget-MI evaluation'):
  """The report's markdown text (see `write_report`)."""
  models = metrics.get('models') or {}
  fraction = metrics.get('forget_fraction')
  parts = [f'# {title}\n']
  paper_f = None
  if _finite_number(fraction):
    paper_f = nearest_paper_fraction(fraction)
    f = float(fraction) / (100.0 if float(fraction) > 1 else 1.0)
    parts.append(f'Forget fraction: {100 * f:.1f} % of the cohort\'s images '
                 f'(paper column shown: {round(100 * paper_f)} %).\n')
  else:
    parts.append('Forget fraction: not recorded (paper comparison omitted).\n')
  # Other top-level fields (e.g. wall_seconds): their scalars only; lists such as training
  # histories are for notebooks, not the report.
  other = {k: v for k, v in _flatten({k: v for k, v in metrics.items()
                                      if k not in ('models', 'config', 'forget_fraction',
                                                   'summary', 'timing')}).items()
           if not isinstance(v, (dict, list))}
  if len(other) > 30:
    other = dict(list(other.items())[:30] + [('…', f'{len(other) - 30} more in metrics.json')])
  if other:
    parts.append('\n'.join(f'- {k}: {format_value(v)}' for k, v in other.items()) + '\n')

  timing = timing_note(metrics.get('timing'))
  if timing:
    parts.append(timing + '\n')

  parts.append('## This run\n')
  if models:
    parts.append(_results_table(models))
    if 'retrain' not in models:
      parts.append('\nNo retrained model in this run: gaps cannot be computed.\n')
  else:
    parts.append('No models were evaluated.\n')

  if metrics.get('summary') and int(metrics.get('seeds') or 1) > 1:
    parts.append(seed_section(metrics['summary'], int(metrics['seeds'])))

  if paper_f is not None:
    parts.append(f'\n## Paper, Table 1 ({round(100 * paper_f)} % forget set)\n')
    parts.append(_paper_table(paper_f))
    parts.append('\nAvg. gap of the paper rows is computed here from the paper\'s retrain row.\n')

  extras = _extras_table(models) if models else None
  if extras:
    parts.append('\n## Additional metrics\n')
    parts.append(extras)

  parts.append('\n## Notes\n')
  parts.append(NOTES)

  config = metrics.get('config')
  if isinstance(config, dict) and config:
    flat = _flatten(config)
    parts.append('\n## Configuration\n')
    parts.append(f'<details><summary>{len(flat)} settings</summary>')
    rows = [[k, f'{v:g}' if isinstance(v, float) else v] for k, v in flat.items()]
    parts.append(markdown_table(['Key', 'Value'], rows, align=['l', 'l']))
    parts.append('</details>')
  return '\n\n'.join(p.strip('\n') for p in parts) + '\n'


def write_report(metrics, path, title='Forget-MI evaluation'):
  """Write the markdown report for `metrics` (a metrics.json dict) atomically; returns path.

  Our table (original, retrain, then the methods) sits above the paper's Table 1 rows for the
  nearest forget fraction, so the pattern (who moves towards retrain) can be compared.
  """
  return _atomic_write(path, build_report(to_jsonable(metrics), title=title))


def render_report_from_json(metrics_json_path, out_md, title='Forget-MI evaluation'):
  """metrics.json -> report.md, so a report can always be regenerated from the contract file."""
  return write_report(read_metrics(metrics_json_path), out_md, title=title)


# ----------------------------------------------------------------------------- figure

_SET_COLORS = {'test': '#1f77b4', 'forget': '#d62728', 'retain': '#2ca02c'}
_OTHER_COLORS = ('#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#7f7f7f')


def plot_loss_histograms(losses, path, bins=40, density=True, log_scale=False, title=None):
  """The paper's Fig. 3: per-sample loss histograms, test vs forget, one panel per model.

  `losses`: {model: {'test': array, 'forget': array, ...}} (extra sets such as 'retain' are
  drawn too). All panels share one set of bin edges so that shapes can be compared across
  models; `density=True` plots each bin's fraction of its set (the sets differ in size; a
  fraction, unlike a density, stays readable with log-spaced bins). `log_scale` uses
  log-spaced bins and a log x-axis (memorised samples have losses near 0). Non-finite losses
  (and, with `log_scale`, zero losses) are dropped and counted in the legend. Saved atomically as PNG via the Agg canvas (no pyplot, no
  global backend change). Returns the path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not losses:
    raise ValueError('plot_loss_histograms needs at least one model')
  clean = {}
  for model, sets in losses.items():
    order = [s for s in ('test', 'forget') if s in sets] + [
        s for s in sets if s not in ('test', 'forget')]
    clean[model] = {}
    for s in order:
      a = np.asarray(sets[s], dtype=np.float64).reshape(-1)
      ok = np.isfinite(a) & ((a > 0) if log_scale else True)
      clean[model][s] = (a[ok], int(a.size - ok.sum()))
  allv = np.concatenate([a for sets in clean.values() for a, _ in sets.values()] +
                        [np.zeros(0)])
  if allv.size == 0:
    raise ValueError('no finite losses to plot')
  if log_scale:
    lo, hi = np.log10(allv.min()), np.log10(allv.max())
    if hi - lo < 1e-9:
      lo, hi = lo - 0.5, hi + 0.5
    edges = np.logspace(lo, hi, bins + 1)
  else:
    edges = np.histogram_bin_edges(allv, bins=bins)

  n = len(clean)
  ncols = min(n, 3)
  nrows = math.ceil(n / ncols)
  fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  extra_colors = iter(_OTHER_COLORS * 4)
  colors = {}
  for i, (model, sets) in enumerate(clean.items()):
    ax = axes[i // ncols][i % ncols]
    for s, (a, dropped) in sets.items():
      if s not in colors:
        colors[s] = _SET_COLORS.get(s) or next(extra_colors)
      label = f'{s} (n={a.size}' + (f', {dropped} dropped' if dropped else '') + ')'
      if a.size == 0:
        ax.plot([], [], color=colors[s], label=label)
        continue
      w = np.full(a.size, 1.0 / a.size) if density else None
      ax.hist(a, bins=edges, weights=w, histtype='stepfilled', alpha=0.35, color=colors[s])
      ax.hist(a, bins=edges, weights=w, histtype='step', linewidth=1.4, color=colors[s],
              label=label)
      ax.axvline(np.median(a), color=colors[s], linestyle='--', linewidth=1)
    if log_scale:
      ax.set_xscale('log')
    ax.set_title(display_name(model))
    ax.set_xlabel('per-sample cross-entropy loss')
    ax.set_ylabel('fraction of set' if density else 'count')
    ax.legend(fontsize=8, frameon=False)
  for j in range(n, nrows * ncols):
    axes[j // ncols][j % ncols].set_visible(False)
  fig.suptitle(title or 'Per-sample losses, test vs forget (dashed: medians)')

  atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120))
  return os.fspath(path)


def write_run_outputs(workdir, payload: dict, losses: dict, logits=None, labels=None,
                      title='Forget-MI evaluation'):
  """A run's outputs: metrics.json (atomic), per-example outputs (losses.npz: '<model>/<set>'
  losses, and with them 'logits/<model>/<set>' and 'labels/<set>', so every metric can be
  recomputed), report.md and the loss histograms (Fig. 3)."""
  write_json_atomic(payload, os.path.join(workdir, 'metrics.json'))
  flat = {f'{m}/{s}': v for m, d in losses.items() for s, v in d.items()}
  flat.update({f'logits/{m}/{s}': v for m, d in (logits or {}).items() for s, v in d.items()})
  flat.update({f'labels/{s}': v for s, v in (labels or {}).items()})
  atomic_write(os.path.join(workdir, 'losses.npz'), lambda f: np.savez(f, **flat))
  write_report(payload, os.path.join(workdir, 'report.md'), title=title)
  plot_loss_histograms({m: {'test': d['test'], 'forget': d['forget']} for m, d in losses.items()
                        if '@' not in m},  # seed 0 of each model (the others: losses.npz)
                       os.path.join(workdir, 'loss_histograms.png'))
  return payload


def write_seed_outputs(workdir, per_example):
  """Per-example retrain-distribution metrics (distributional.npz: '<method>/<metric>') and
  their figure (retrain_distribution.png), when the run has them (num_seeds >= 2)."""
  if not per_example:
    return None
  flat = {f'{m}/{k}': v for m, d in per_example.items() for k, v in d.items()}
  atomic_write(os.path.join(workdir, 'distributional.npz'), lambda f: np.savez(f, **flat))
  return plot_retrain_distribution(per_example, os.path.join(workdir,
                                                             'retrain_distribution.png'))


def plot_retrain_distribution(per_example, path):
  """Left: per-example KLoM on the forget set, per method (ECDF); right: per forgotten
  patient, the max over their images. A curve far left = close to retraining."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  panels = (('klom_forget', 'forget images'), ('klom_forget_patient', 'forgotten patients'))
  for ax, (key, what) in zip(axes, panels):
    for j, (name, d) in enumerate(per_example.items()):
      v = np.sort(np.asarray(d.get(key, []), np.float64))
      v = v[np.isfinite(v)]
      if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where='post', label=display_name(name),
                color=plt.cm.tab10(j % 10))
    ax.set_xscale('symlog', linthresh=0.1)
    ax.set_xlabel('KLoM (KL of margin distributions, unlearned vs retrained)')
    ax.set_ylabel(f'fraction of {what}')
    ax.set_title(f'KLoM per {what.split()[-1][:-1]}')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, frameon=False)
  fig.suptitle('Distance to the retrained models, per example and per patient (left = closer)')
  fig.tight_layout()
  atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120))
  plt.close(fig)
  return os.fspath(path)
