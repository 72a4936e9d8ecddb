"""Ablation grid wall time: vmapped (one program over stacked copies) vs sequential settings.

  python benchmarks/bench_ablation.py [--configs tiny,default] [--default_epochs 3]
                                      [--workdir runs/bench_ablation]

The grid is the paper's 5 loss-weight settings (no_noise, equal, multimodal, unimodal,
retention) at 10 %, image noise (0, 0.1), lr 1e-4, seed 0, on configs/ablation.py:pct=10:
'tiny' = its ':smoke' variant, 'default' = the synthetic default (64 px, tiny BERT) with the
unlearning epochs cut to --default_epochs (the paper's 30 take ~10x longer; both modes scale
the same way per epoch). Timed: training only (frozen-original targets, compilation, epochs,
per-epoch checkpoints; not the original/retrained models, which come from the cache, nor
evaluation), both through forgetmi_jax.runs.ablation.train_grid on the one loop:
- vmapped: mode='vmap', the 5 settings as 5 stacked copies of one ForgetMIMethod, one chunk;
- sequential: mode='sequential', each setting its own one-copy run (what
  `ablation.mode=sequential` runs: its own compile, target caching and checkpoints).
Also printed: the largest parameter difference between the two modes' final models.
"""
import argparse
import copy
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

SETTINGS = ('no_noise', 'equal', 'multimodal', 'unimodal', 'retention')


# The paper's size (REFERENCE 9): 2048 px, its 7-stage ResNet, a BERT-base-shaped text encoder
# (random init: the arithmetic is SciBERT's), 320 tokens.
PAPER_SIZE = {'data.image_size': 2048, 'model.image.preset': 'paper', 'data.max_text_len': 320,
              'model.text.hidden_size': 768, 'model.text.num_hidden_layers': 12,
              'model.text.num_attention_heads': 12, 'model.text.intermediate_size': 3072,
              'model.text.max_position_embeddings': 512}


def make_config(name, default_epochs, workdir):
  """'tiny' (the smoke variant), 'default' (the synthetic default, epochs cut) or 'paper'
  (the default at PAPER_SIZE, epochs cut)."""
  from configs import ablation
  c = ablation.get_config('pct=10,smoke' if name == 'tiny' else 'pct=10')
  with c.unlocked():
    if name == 'paper':
      for dotted, value in PAPER_SIZE.items():
        *parents, leaf = dotted.split('.')
        node = c
        for key in parents:
          node = node[key]
        node[leaf] = value
    c.ablation.settings = SETTINGS
    c.ablation.noise = ((0.0, 0.1),)
    c.ablation.lrs = (1e-4,)
    c.ablation.seeds = (0,)
    c.ablation.chunk_size = len(SETTINGS)  # one program for the five settings
    if name != 'tiny':
      c.forgetmi.epochs = int(default_epochs)
    c.workdir = os.path.join(workdir, name)
  return c


def bench(name, args, train_original=True):
  """Both modes' wall times; `train_original=False` unlearns from fresh variables instead of a
  trained original (the same arithmetic, without training one at the paper's size first)."""
  from forgetmi_jax.runs import ablation, setup
  config = make_config(name, args.default_epochs, args.workdir)
  prep = setup.prepare(copy.deepcopy(config), f'bench_ablation_{name}')
  if train_original:
    (original,), _ = setup.train_or_load(prep, 'original')
  else:
    original = prep.init_variables(0)
  settings = ablation.expand_grid(config.ablation)
  ctx = setup.make_context(prep)  # noisy report tokens: made once, outside both timings
  times, states = {}, {}
  for mode in ('vmap', 'sequential'):
    with tempfile.TemporaryDirectory() as ckpt:  # fresh checkpoints: nothing resumes
      t = time.perf_counter()
      units = list(ablation.train_grid(prep, original, settings, mode, config.ablation, ctx=ctx,
                                       ckpt_root=ckpt))
      times[mode] = time.perf_counter() - t
    states[mode] = [s for u in units for s in u.states]
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for v, s in zip(states['vmap'], states['sequential'])
             for a, b in zip(jax.tree_util.tree_leaves(v.params),
                             jax.tree_util.tree_leaves(s.params)))
  t_vmap, t_seq = times['vmap'], times['sequential']
  bs = int(config.forgetmi.batch_size)
  steps = -(-len(prep.split.forget_idx) // bs)
  epochs = int(config.forgetmi.epochs)
  note = '' if name == 'tiny' else f' (paper: 30; cut to {epochs})'
  return {'config': f'{name}: {config.data.image_size} px, {config.model.image.preset}, '
                    f'BERT {config.model.text.num_hidden_layers}x{config.model.text.hidden_size}',
          'epochs': f'{epochs}{note}', 'steps': f'{steps} x ({bs}+{bs})',
          'vmap': t_vmap, 'seq': t_seq, 'diff': diff}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--configs', default='tiny,default')
  ap.add_argument('--default_epochs', type=int, default=3)
  ap.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'bench_ablation'))
  args = ap.parse_args()
  import logging
  logging.getLogger('absl').setLevel(logging.WARNING)
  rows = [bench(n.strip(), args) for n in args.configs.split(',') if n.strip()]
  dev = jax.devices()[0]
  print(f'\nForget-MI ablation grid, {len(SETTINGS)} paper settings at 10 %, noise (0, 0.1), '
        f'lr 1e-4; device: {len(jax.devices())} x {dev.device_kind} ({dev.platform}), '
        f'{os.cpu_count()} CPU cores')
  head = (f"| {'config':<34} | {'epochs':<22} | {'steps/epoch':<14} | {'vmapped s':>9} | "
          f"{'sequential s':>12} | {'seq/vmap':>8} | {'max dparam':>12} |")
  print(head)
  print('|' + '|'.join('-' * (len(c)) for c in head.split('|')[1:-1]) + '|')
  for r in rows:
    print(f"| {r['config']:<34} | {r['epochs']:<22} | {r['steps']:<14} | {r['vmap']:>9.1f} | "
          f"{r['seq']:>12.1f} | {r['seq'] / r['vmap']:>8.2f} | {r['diff']:>12.2e} |")
  print('Times: training only (targets of the frozen original, compilation, epochs, per-epoch '
        'checkpoints); the original model is cached; evaluation excluded. Sequential pays a '
        'compile and target caching per setting, as ablation.mode=sequential runs it.')


if __name__ == '__main__':
  main()
