"""float32 vs bfloat16 compute for the Forget-MI step, timed interleaved (f32, bf16, f32, ...)
so that a shared machine's changing load hits both alike.

  python benchmarks/bench_dtype.py [--sizes tiny,mid] [--batch 16] [--rounds 8]
      [--path cached] [--text full]

Prints per size: median step seconds of each dtype, bf16 / f32 time ratio, and the largest
relative difference of the first step's four Forget-MI terms (same params, same batch).
Parameters are float32 in both (`model.dtype` only sets the compute dtype).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _step as S  # noqa: E402
from forgetmi_jax.data.trim import length_buckets, trim_batch  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--sizes', default='tiny,mid')
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--rounds', type=int, default=8)
  ap.add_argument('--path', default='cached', choices=('live', 'cached'))
  ap.add_argument('--text', default='full', choices=('full', 'real'))
  args = ap.parse_args()
  lengths = S.synthetic_report_lengths() if args.text == 'real' else None
  load = os.getloadavg()
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} cpus, load average {load[0]:.2f} / '
        f'{load[1]:.2f} / {load[2]:.2f}; path {args.path}, text {args.text}, batch {args.batch}')
  print('| size | float32 s | bfloat16 s | bf16 / f32 time | max rel. diff of UR, UU, MU, MR '
        '| load |')
  print('|---|---|---|---|---|---|')
  for size in args.sizes.split(','):
    v = S.jax_model(size)[1]()
    b = S.step_batch(size, args.batch, lengths)
    if lengths is not None:
      b = trim_batch(b, length_buckets(S.SIZES[size]['tokens'], 'multiple', 32))
    runs = {}
    for dtype in ('float32', 'bfloat16'):
      model, _ = S.jax_model(size, dtype)
      step, state, hp, add_targets = S.package_step(model, v)
      bb = jax.device_put(add_targets(b) if args.path == 'cached' else b)
      c = step.lower(state, v, bb, jax.random.PRNGKey(3), hp).compile()
      _, m = c(state, v, bb, jax.random.PRNGKey(3), hp)
      terms = np.array([float(m[k]) for k in ('ur', 'uu', 'mu', 'mr')])
      runs[dtype] = (c, state, bb, hp, terms, [])
    for i in range(args.rounds):
      for dtype, (c, state, bb, hp, _, times) in runs.items():
        t0 = time.time()
        jax.block_until_ready(c(state, v, bb, jax.random.PRNGKey(4 + i), hp))
        times.append(time.time() - t0)
    t32, t16 = (float(np.median(runs[d][5])) for d in ('float32', 'bfloat16'))
    l32, l16 = runs['float32'][4], runs['bfloat16'][4]
    print(f'| {size} | {t32:.3f} | {t16:.3f} | {t16 / t32:.2f} | '
          f'{np.max(np.abs(l16 - l32) / np.abs(l32)):.1e} | {os.getloadavg()[0]:.1f} |',
          flush=True)


if __name__ == '__main__':
  main()
