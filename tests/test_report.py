"""Report round-trip (metrics.json -> report.md), the paper table, JSON writing and Fig. 3."""
import json
import os

import numpy as np
import pytest

from forgetmi_jax.evaluation import report as R
from forgetmi_jax.evaluation.gaps import METRIC_KEYS, retrain_gaps

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'REFERENCE.md')


def _metrics():
  def m(mia, fa, ff, ta, tf, d, s, **extra):
    return dict(mia=mia, forget_auc=fa, forget_f1=ff, test_auc=ta, test_f1=tf,
                distance_to_retrain=d, seconds=s, **extra)
  return {
      'forget_fraction': 0.1,
      # Deliberately not in report order: the report puts original and retrain first.
      'models': {
          'forgetmi': m(np.float32(0.5), 0.7, 0.35, 0.61, 0.3, 0.123456, 42.25,
                        mia_logreg={'attack_auc': 0.66, 'forget_vs_test_auc': 0.55},
                        forget_auc_skipped_classes=[3]),
          'original': m(1.0, 0.999, 0.97, 0.677, 0.388, 0.4, 100.0),
          'retrain': m(0.25, 0.6, 0.33, 0.63, 0.38, 0.0, 90.0),
          'scrub': m(None, float('nan'), 0.9, 0.65, None, None, None),
      },
      'config': {'seed': 0, 'unlearn': {'lr': 1e-4, 'epochs': 30}, 'data': {'kind': 'synthetic'}},
  }


def _rows(md, first_header):
  """Rows of the table whose first header cell is `first_header`, as lists of cell strings."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(f'| {first_header} |'))
  rows = []
  for l in lines[start + 2:]:
    if not l.startswith('|'):
      break
    rows.append([c.strip() for c in l.strip().strip('|').split('|')])
  return rows


def test_paper_table_matches_reference():
  t = R.PAPER_TABLE1
  assert set(t) == {0.03, 0.06, 0.10}
  for f in t:
    assert set(t[f]) == {'original', 'retrain', 'neggrad_plus', 'scrub', 'cf_k', 'eu_k',
                         'multidelete', 'forgetmi'}
  assert t[0.10]['forgetmi'] == dict(mia=0.81, forget_auc=0.656, forget_f1=0.313,
                                     test_auc=0.565, test_f1=0.252)
  assert t[0.06]['retrain']['mia'] == 0.769 and t[0.03]['eu_k']['forget_auc'] == 0.996
  if not os.path.exists(REFERENCE):
    pytest.skip('shared REFERENCE.md not available')
  names = {'Original': 'original', 'Retrain': 'retrain', 'NegGrad+': 'neggrad_plus',
           'SCRUB': 'scrub', 'CF-k': 'cf_k', 'EU-k': 'eu_k', 'MultiDelete': 'multidelete',
           'Forget-MI': 'forgetmi'}
  seen = 0
  for line in open(REFERENCE, encoding='utf-8'):
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 4 and cells[0] in names:
      for f, cell in zip((0.03, 0.06, 0.10), cells[1:]):
        vals = [float(v) for v in cell.split()]
        assert [t[f][names[cells[0]]][k] for k in METRIC_KEYS] == vals, (cells[0], f)
      seen += 1
  assert seen == 8


def test_markdown_table_formatting():
  md = R.markdown_table(['name', 'x', 'n'], [['a|b', 0.12345, 3], ['c', None, float('nan')]])
  lines = md.strip().splitlines()
  assert lines[0] == '| name | x | n |'
  assert lines[1] == '| :--- | ---: | ---: |'
  assert lines[2] == '| a\\|b | 0.123 | 3 |'
  assert lines[3] == '| c | — | — |'
  with pytest.raises(ValueError):
    R.markdown_table(['a', 'b'], [[1]])


def test_write_json_atomic_handles_numpy_and_nan(tmp_path):
  p = tmp_path / 'sub' / 'x.json'
  obj = {'a': np.float32(0.5), 'b': np.int64(3), 'c': float('nan'), 'd': np.array([1.0, np.inf]),
         'e': (np.bool_(True), None), 1: 'k'}
  R.write_json_atomic(obj, p)
  text = p.read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  back = json.loads(text)
  assert back == {'a': 0.5, 'b': 3, 'c': None, 'd': [1.0, None], 'e': [True, None], '1': 'k'}
  assert os.listdir(p.parent) == ['x.json']  # no temp file left behind


def test_round_trip_report_contains_the_right_numbers(tmp_path):
  mj, md_path = tmp_path / 'metrics.json', tmp_path / 'report.md'
  R.write_json_atomic(_metrics(), mj)
  assert R.read_metrics(mj)['models']['scrub']['mia'] is None
  R.render_report_from_json(mj, md_path)
  md = md_path.read_text()
  rows = _rows(md, 'Model')
  assert [r[0] for r in rows] == ['Original', 'Retrain', 'Forget-MI+ (beyond paper)', 'SCRUB']
  fm = rows[2]
  assert fm[1:8] == ['0.500', '0.700', '0.350', '0.610', '0.300', '0.123', '42.2']
  expected_gap = retrain_gaps(_metrics()['models']['forgetmi'], _metrics()['models']['retrain'])
  assert fm[8] == f"{expected_gap['avg_gap']:.3f}"
  assert rows[1][8] == '0.000'
  # Nulls and nan render as '—'; SCRUB's gap averages only forget F1 and test AUC.
  sc = rows[3]
  assert sc[1] == '—' and sc[2] == '—' and sc[5] == '—' and sc[6] == '—' and sc[7] == '—'
  assert sc[8] == f'{(abs(0.9 - 0.33) + abs(0.65 - 0.63)) / 2:.3f}'
  # Paper rows for 10 %, with the avg gap computed from the paper's retrain row.
  assert '## Paper, Table 1 (10 % forget set)' in md
  prow = {r[0]: r for r in _rows(md, 'Model (paper)')}
  assert prow['Forget-MI (paper)'][1:] == ['0.810', '0.656', '0.313', '0.565', '0.252', '0.182']
  assert prow['Retrain'][6] == '0.000'
  # Extras are rendered (nested dicts flattened, lists inline), and the config summarised.
  assert ('| Model | mia_logreg.attack_auc | mia_logreg.forget_vs_test_auc | '
          'forget_auc_skipped_classes |') in md
  assert '| Forget-MI+ (beyond paper) | 0.660 | 0.550 | [3] |' in md
  assert '| Original | — | — | — |' in md
  assert '| unlearn.epochs | 30 |' in md
  assert 'lower' in md.lower() and 'retrain' in md.lower()
  assert sorted(os.listdir(tmp_path)) == ['metrics.json', 'report.md']


def test_report_nearest_fraction_and_missing_parts(tmp_path):
  assert R.nearest_paper_fraction(0.07) == 0.06
  assert R.nearest_paper_fraction(0.02) == 0.03
  assert R.nearest_paper_fraction(10) == 0.10
  m = {'forget_fraction': 0.05, 'models': {'original': {'mia': 1.0}, 'forgetmi': {'mia': None}},
       'wall_seconds': {'total': 12.5}, 'history': {'forgetmi': {'loss': [3.0, 2.0]}}}
  p = R.write_report(m, tmp_path / 'r.md', title='T')
  md = open(p, encoding='utf-8').read()
  assert md.startswith('# T')
  assert '(6 % forget set)' in md
  assert 'gaps cannot be computed' in md
  assert '- wall_seconds.total: 12.500' in md and 'history' not in md  # lists stay in json
  rows = _rows(md, 'Model')
  assert rows[1] == ['Forget-MI+ (beyond paper)'] + ['—'] * 8
  md2 = R.build_report({'models': {}})
  assert 'paper comparison omitted' in md2 and 'No models' in md2


def test_read_metrics_rejects_non_metrics(tmp_path):
  p = tmp_path / 'bad.json'
  p.write_text('{"a": 1}')
  with pytest.raises(ValueError):
    R.read_metrics(p)


def test_loss_histograms_png(tmp_path):
  import matplotlib.image
  r = np.random.default_rng(0)
  losses = {
      'original': {'test': r.exponential(1.2, 531), 'forget': r.exponential(0.05, 201)},
      'forgetmi': {'test': r.exponential(1.3, 531), 'forget': r.exponential(1.0, 201)},
      'retrain': {'test': r.exponential(1.2, 531), 'forget': np.append(r.exponential(1.1, 200),
                                                                       np.inf)},
      'scrub': {'test': r.exponential(1.2, 531), 'forget': r.exponential(0.1, 201),
                'retain': r.exponential(0.05, 300)},
  }
  p = R.plot_loss_histograms(losses, tmp_path / 'fig' / 'losses.png')
  with open(p, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  img = matplotlib.image.imread(p)
  assert img.shape[0] > 600 and img.shape[1] > 1200  # 2 rows x 3 columns of panels
  assert os.listdir(tmp_path / 'fig') == ['losses.png']
  two = R.plot_loss_histograms({k: losses[k] for k in ('original', 'forgetmi')},
                               tmp_path / 'two.png', log_scale=True)
  assert matplotlib.image.imread(two).shape[1] < img.shape[1]
  with pytest.raises(ValueError):
    R.plot_loss_histograms({}, tmp_path / 'none.png')


def test_timing_note_says_when_and_on_what_each_row_was_timed():
  run = {'at': '2026-12-07T15:40:00+00:00', 'devices': '1 x cpu', 'cpus': 2}
  cached = {'at': '2026-12-01T09:00:00+00:00', 'devices': '1 x H100', 'cpus': 16}
  note = R.timing_note({'this_run': run, 'original': None, 'retrain': [cached, cached]})
  assert note.startswith("Seconds: this run's methods timed 2026-12-07T15:40:00+00:00 on "
                         '1 x cpu (2 CPUs); the original model when trained, at a time and on '
                         'hardware not recorded')
  # stacked seeds share one stamp: said once
  assert note.count('2026-12-01T09:00:00+00:00 on 1 x H100 (16 CPUs)') == 1
  assert 'the retrained models when trained' in note
  assert R.timing_note(None) is None and R.timing_note({}) is None
  md = R.build_report({'models': {}, 'timing': {'this_run': run, 'retrain': [cached]}})
  assert 'the retrained model when trained, 2026-12-01' in md
  assert '- timing.' not in md  # the note, not the flattened fields
