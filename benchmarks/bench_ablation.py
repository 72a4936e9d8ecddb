"""Ablation grid wall time: vmapped (one program over stacked copies) vs sequential settings.

  python benchmarks/bench_ablation.py [--configs tiny,default] [--default_epochs 3]
                                      [--workdir runs/bench_ablation]

The grid is the paper's 5 loss-weight settings (no_noise, equal, multimodal, unimodal,
retention) at 10 %, image noise (0, 0.1), lr 1e-4, seed 0, on configs/ablation_10pct.py:
'tiny' = its ':smoke' variant, 'default' = the synthetic default (64 px, tiny BERT) with the
unlearning epochs cut to --default_epochs (the paper's 30 take ~10x longer; both modes scale
the same way per epoch). Timed: training only (frozen-original targets, compilation, epochs;
not the original/retrained models, which come from the cache, nor evaluation):
- vmapped: forgetmi_jax.ablation.train_grid(mode='vmap'), all 5 settings in one chunk;
- sequential: the same settings one by one through ForgetMIMethod + run_unlearning (what
  `ablation.mode=sequential` runs: its own compile, target caching and per-epoch checkpoints).
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


def make_config(name, default_epochs, workdir):
  from configs import ablation_10pct
  c = ablation_10pct.get_config('smoke' if name == 'tiny' else None)
  with c.unlocked():
    c.ablation.settings = SETTINGS
    c.ablation.noise = ((0.0, 0.1),)
    c.ablation.lrs = (1e-4,)
    c.ablation.seeds = (0,)
    c.ablation.chunk_size = len(SETTINGS)  # one program for the five settings
    if name == 'default':
      c.unlearn.epochs = int(default_epochs)
    c.workdir = os.path.join(workdir, name)
  return c


def bench(name, args):
  from forgetmi_jax import ablation, pipeline
  from forgetmi_jax.unlearning import grid
  config = make_config(name, args.default_epochs, args.workdir)
  prep = pipeline.prepare(copy.deepcopy(config), f'bench_ablation_{name}')
  non_test = np.sort(np.concatenate([prep.split.forget_idx, prep.split.retain_idx]))
  original, _ = pipeline.train_or_load(prep, 'original', non_test)
  settings = grid.expand_grid(config.ablation)
  t = time.perf_counter()
  v_units = list(ablation.train_grid(prep, original, settings, 'vmap', config.ablation))
  t_vmap = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as ckpt:
    t = time.perf_counter()
    s_units = list(ablation.train_grid(prep, original, settings, 'sequential', ckpt_root=ckpt))
    t_seq = time.perf_counter() - t
  v_states = [s for u in v_units for s in u[1]]
  s_states = [s for u in s_units for s in u[1]]
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for v, s in zip(v_states, s_states)
             for a, b in zip(jax.tree.leaves(v.params), jax.tree.leaves(s.params)))
  bs = int(config.unlearn.batch_size)
  steps = -(-len(prep.split.forget_idx) // bs)
  epochs = int(config.unlearn.epochs)
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
  print(f'\nForget-MI ablation grid, {len(SETTINGS)} paper settings at 10 %, noise (0, 0.1), lr 1e-4; '
        f'device: {len(jax.devices())} x {dev.device_kind} ({dev.platform}), '
        f'{os.cpu_count()} CPU cores')
  head = (f"| {'config':<34} | {'epochs':<22} | {'steps/epoch':<14} | {'vmapped s':>9} | "
          f"{'sequential s':>12} | {'seq/vmap':>8} | {'max dparam':>12} |")
  print(head)
  print('|' + '|'.join('-' * (len(c)) for c in head.split('|')[1:-1]) + '|')
  for r in rows:
    print(f"| {r['config']:<34} | {r['epochs']:<22} | {r['steps']:<14} | {r['vmap']:>9.1f} | "
          f"{r['seq']:>12.1f} | {r['seq'] / r['vmap']:>8.2f} | {r['diff']:>12.2e} |")
  print('Times: training only (targets of the frozen original, compilation, epochs); the '
        'original model is cached; evaluation excluded. Sequential includes a compile, target '
        'caching and per-epoch checkpoints per setting, as ablation.mode=sequential runs it.')


if __name__ == '__main__':
  main()
