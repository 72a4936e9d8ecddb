"""Forget-MI step time and peak memory at the three sizes of REFERENCE 9, live vs cached
original, beside the public PyTorch code's figures measured on the same machine kind.

  python benchmarks/bench_unlearn_step.py [--sizes tiny,mid,paper] [--batches 4,16] [--steps 3]
                                          [--paths live,cached] [--dtype bfloat16]

Each (size, batch, path) runs in its own subprocess so its peak RSS is its own. 'live' runs the
frozen original inside the step (noisy forget + retain forwards); 'cached' feeds the
original's outputs as inputs (they are fixed in eval mode with fixed noise draws), which is
what the main command does by default.

Columns: median step time after a warm-up step; compile time; the worker's peak RSS; XLA's
own plan (arguments + outputs + temporaries); XLA's FLOP count of the compiled step and the
rate it ran at (the public code does the same arithmetic as 'live'). A step whose plan exceeds
--max-gb is compiled but not run, so the table reports it instead of the OOM killer.
"""
import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # REFERENCE 9
    'tiny': dict(image=32 * 2, preset='small64', layers=2, hidden=128, heads=2, ffn=512, tokens=32,
                 vocab=30522),
    'mid': dict(image=512, preset='mid512', layers=4, hidden=256, heads=4, ffn=1024, tokens=128,
                vocab=30522),
    'paper': dict(image=2048, preset='paper', layers=12, hidden=768, heads=12, ffn=3072,
                  tokens=320, vocab=31090),
}
# The public code's step on this machine kind (REFERENCE 9): (median s, peak GB).
REFERENCE = {('paper', 4): (19.9, 9.3), ('paper', 8): (41.4, 16.7), ('paper', 16): (None, 32.0),
             ('mid', 16): (1.81, 1.9), ('tiny', 16): (0.198, 0.7)}
MID512 = dict(stem_channels=8, stem_kernel=7, stem_stride=4,
              stage_channels=(16, 32, 64, 128, 192), blocks_per_stage=2, pool='adaptive',
              pool_grid=2, embed_dim=None)


def worker(size, batch, path, steps, max_gb, dtype):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from forgetmi_jax.models.bert import BertConfig
  from forgetmi_jax.models.multimodal import MultimodalModel, init_variables
  from forgetmi_jax.models.resnet import resnet_preset
  from forgetmi_jax.train.state import HEAD_NAMES, TrainState, make_optimizer
  from forgetmi_jax.unlearning.forgetmi import forget_targets, make_unlearn_step, retain_targets
  s = SIZES[size]
  image = MID512 if s['preset'] == 'mid512' else resnet_preset(s['preset'])
  text = BertConfig(vocab_size=s['vocab'], hidden_size=s['hidden'],
                    num_hidden_layers=s['layers'], num_attention_heads=s['heads'],
                    intermediate_size=s['ffn'], max_position_embeddings=max(512, s['tokens']))
  model = MultimodalModel(image=image, text=text, fusion={}, dtype=jnp.dtype(dtype))
  v = init_variables(model, jax.random.PRNGKey(0), s['image'], s['tokens'])
  tx = make_optimizer(v['params'], 1e-4, frozen=HEAD_NAMES)
  state = TrainState.create(v['params'], v['batch_stats'], tx, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)

  def examples(offset):
    return {'image': rng.uniform(size=(batch, s['image'], s['image'], 1)).astype(np.float32),
            'input_ids': rng.integers(1, 1000, (batch, s['tokens'])).astype(np.int32),
            'attention_mask': np.ones((batch, s['tokens']), np.int32),
            'label': rng.integers(0, 4, batch).astype(np.int32),
            'id': np.arange(offset, offset + batch, dtype=np.int32),
            'mask': np.ones(batch, np.float32)}
  forget = examples(0)
  b = {'forget': forget, 'retain': examples(batch),
       'forget_noisy': {'input_ids': forget['input_ids'][None],
                        'attention_mask': forget['attention_mask'][None]}}
  hp = {'loss_weights': jnp.full((4,), 0.25), 'noise_mu': jnp.float32(0),
        'noise_sigma': jnp.float32(0.1), 'noise_key': jax.random.PRNGKey(2),
        'epoch': jnp.int32(0), 'retention_cap': jnp.full((2,), 1e30)}
  if path == 'cached':
    t = forget_targets(model.apply, v['params'], v['batch_stats'], b, hp, num_draws=1,
                       no_noise=False, resample_noise=False)
    t.update(retain_targets(model.apply, v['params'], v['batch_stats'], b['retain']))
    t = {k: np.asarray(x) for k, x in t.items()}
    for k in ('forget_uni', 'forget_joint'):
      t[k] = np.swapaxes(t[k], 0, 1)
    b['targets'] = t
  step = make_unlearn_step(model.apply, num_draws=1)
  t0 = time.time()
  step = step.lower(state, v['params'], v['batch_stats'], b, jax.random.PRNGKey(3), hp).compile()
  compile_s = time.time() - t0
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop = float(cost.get('flops', float('nan'))) / 1e9 if cost else None
  mem = step.memory_analysis()
  xla_gb = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes) / 2 ** 30
  if xla_gb is not None and xla_gb > max_gb:  # would be OOM-killed: report XLA's plan instead
    print(json.dumps({'first_s': compile_s, 'median_s': None, 'peak_gb': None,
                      'xla_gb': xla_gb, 'gflop': gflop,
                      'error': f'XLA plans {xla_gb:.1f} GB > {max_gb} GB'}))
    return
  state, m = step(state, v['params'], v['batch_stats'], b, jax.random.PRNGKey(3), hp)
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t0 = time.time()
    state, m = step(state, v['params'], v['batch_stats'], b, jax.random.PRNGKey(4 + i), hp)
    jax.block_until_ready(m)
    times.append(time.time() - t0)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print(json.dumps({'first_s': compile_s, 'median_s': float(np.median(times)),
                    'peak_gb': peak_gb, 'xla_gb': xla_gb, 'gflop': gflop}))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--sizes', default='tiny,mid,paper')
  ap.add_argument('--batches', default='4,16')
  ap.add_argument('--paths', default='live,cached')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--max-gb', type=float, default=22.0,
                  help='skip running a step whose compiled plan exceeds this (machine: 24 GB)')
  ap.add_argument('--dtype', default='float32',
                  help="compute dtype of the model (params stay float32), e.g. 'bfloat16'")
  ap.add_argument('--worker', nargs=3)
  args = ap.parse_args()
  if args.worker:
    size, batch, path = args.worker
    worker(size, int(batch), path, args.steps, args.max_gb, args.dtype)
    return
  import jax
  print(f'device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, '
        f'compute dtype {args.dtype}')
  print('| size | batch/set | path | step median s | compile s | peak RSS GB | XLA plan GB '
        '| GFLOP/step | GFLOP/s | public code s | public code GB | speed-up |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for size, batch, path in itertools.product(
      args.sizes.split(','), map(int, args.batches.split(',')), args.paths.split(',')):
    out = subprocess.run([sys.executable, __file__, '--steps', str(args.steps),
                          '--max-gb', str(args.max_gb), '--dtype', args.dtype,
                          '--worker', size, str(batch), path], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
      r = {'median_s': None, 'first_s': None,
           'peak_gb': None, 'error': (out.stderr.strip().splitlines() or ['?'])[-1][:80]}
    else:
      r = json.loads(lines[-1])
    ref_s, ref_gb = REFERENCE.get((size, batch), (None, None))
    speed = (f"{ref_s / r['median_s']:.1f}x" if ref_s and r['median_s'] else '—')
    fmt = lambda x, d=3: '—' if x is None else f'{x:.{d}f}'
    gflop = r.get('gflop')
    rate = gflop / r['median_s'] if gflop and r['median_s'] else None
    print(f"| {size} | {batch} | {path} | {fmt(r['median_s'])} | "
          f"{fmt(r['first_s'], 1)} | {fmt(r['peak_gb'], 2)} | {fmt(r.get('xla_gb'), 2)} | "
          f"{fmt(gflop, 1)} | {fmt(rate, 1)} | {fmt(ref_s, 2)} | {fmt(ref_gb, 1)} | {speed} |"
          + (f" {r['error']}" if 'error' in r else ''), flush=True)


if __name__ == '__main__':
  main()
