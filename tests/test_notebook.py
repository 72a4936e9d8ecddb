"""The Colab notebook, executed top to bottom on CPU in smoke mode, so it cannot rot."""
import json
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'forgetmi_colab.ipynb')


def test_colab_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  monkeypatch.setenv('FORGETMI_SMOKE', '1')
  monkeypatch.setenv('FORGETMI_WORKDIR', str(tmp_path))
  monkeypatch.setenv('FORGETMI_REPO_URL', '')  # must use this checkout, never clone
  client = NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute()  # raises CellExecutionError on any failing cell

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'skipping pip' in text  # the install cell found everything installed
  assert 'smoke configs' in text and 'cpu' in text
  kinds = [k for o in outputs for k in o.get('data', {})]
  assert 'text/markdown' in kinds and 'image/png' in kinds  # report.md and Fig. 3 inline

  run = tmp_path / 'forgetmi_10pct'
  for name in ('metrics.json', 'report.md', 'loss_histograms.png', 'losses.npz'):
    assert (run / name).exists(), name
  metrics = json.loads((run / 'metrics.json').read_text())
  assert set(metrics['models']) == {'original', 'retrain', 'forgetmi'}
  ab = json.loads((tmp_path / 'ablation_10pct' / 'ablation.json').read_text())
  assert [r['setting'] for r in ab['rows']] == ['no_noise', 'equal', 'multimodal', 'unimodal',
                                                'retention']
  assert ab['best']['setting_id'] in {r['setting_id'] for r in ab['rows']}
  # The ablation reused the models the first run cached (one cache, no second training).
  assert sorted(p.name.split('-')[0] for p in (tmp_path / 'cache').iterdir()
                if (p / 'COMPLETE').exists() and p.name.startswith(('original-', 'retrain-'))
                ) == ['original', 'retrain']
  markdown = [o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {})]
  assert any('# Forget-MI ablation' in m for m in markdown)
