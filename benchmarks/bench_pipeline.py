"""Input-pipeline throughput: examples/s of training and unlearning batches.

  python benchmarks/bench_pipeline.py [--image_size 64] [--num_subjects 1663] [--epochs 3]

Synthetic default cohort, WordPiece tokens (vocab 2000, 64 tokens); training batches of 32 over
all non-TEST images (shuffled), unlearning steps of 16 forget + 16 retain (10 % forget set,
char text noise, 1 draw). Only the pipeline runs (no model), so this is its ceiling.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _drain(it):
  n = steps = 0
  for b in it:
    steps += 1
    if 'forget' in b:
      n += int(b['forget']['mask'].sum() + b['retain']['mask'].sum())
    else:
      n += int(b['mask'].sum())
  return steps, n


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--num_subjects', type=int, default=1663)
  ap.add_argument('--epochs', type=int, default=3)
  ap.add_argument('--threads', default='0,1,2', help='grain reader threads to compare')
  args = ap.parse_args()

  from forgetmi_jax.data import pipeline as P
  from forgetmi_jax.data.forget_sets import RetainSampler, make_forget_split
  from forgetmi_jax.data.noise import TextNoiser
  from forgetmi_jax.data.synthetic import make_synthetic_cohort
  from forgetmi_jax.data.tokenizer import train_wordpiece_tokenizer

  setup = []
  t = time.perf_counter()
  cohort = make_synthetic_cohort(seed=0, image_size=args.image_size,
                                 num_subjects=args.num_subjects)
  setup.append(('synthetic cohort', time.perf_counter() - t, f'{len(cohort)} images'))
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    tok = train_wordpiece_tokenizer(cohort.reports, 2000, os.path.join(d, 'tok'))
    setup.append(('train tokenizer', time.perf_counter() - t, f'vocab {len(tok)}'))
  t = time.perf_counter()
  source = P.make_arrays(cohort, P.tokenize(tok, cohort.reports, 64))
  setup.append(('tokenize (dedup)', time.perf_counter() - t, f'{len(set(cohort.reports))} texts'))
  split = make_forget_split(cohort, 0.10, seed=0)
  sampler = RetainSampler(cohort.subject_id, split.retain_idx, split.forget_subjects, seed=0)
  t = time.perf_counter()
  noisy = P.make_noisy_tokens(tok, cohort, split.forget_idx, TextNoiser('char', 0.1), 64)
  setup.append(('noisy forget tokens', time.perf_counter() - t, f'{len(split.forget_idx)} x 1'))
  train_idx = np.flatnonzero(cohort.fold != 'TEST')

  print(f'\nsetup ({args.image_size}px, {os.cpu_count()} cores)')
  print(f'{"step":<22}{"seconds":>9}  detail')
  for name, sec, detail in setup:
    print(f'{name:<22}{sec:>9.2f}  {detail}')

  _drain(P.batches(source, train_idx[:64], 32))  # warm-up: grain import, first reads
  rows = []
  for threads in [int(x) for x in args.threads.split(',')]:
    for kind in ('train b32', 'unlearn 16+16'):
      total_steps = total_n = 0
      t = time.perf_counter()
      for epoch in range(args.epochs):
        if kind.startswith('train'):
          it = P.batches(source, train_idx, 32, seed=0, epoch=epoch, num_threads=threads)
        else:
          it = P.unlearning_batches(source, split.forget_idx, sampler, epoch, 16,
                                    noisy_tokens=noisy, seed=0, num_threads=threads)
        s, n = _drain(it)
        total_steps += s
        total_n += n
      sec = time.perf_counter() - t
      rows.append((kind, threads, total_steps, total_n, sec))
  print(f'\n{"pipeline":<15}{"threads":>8}{"steps":>8}{"examples":>10}{"seconds":>9}'
        f'{"examples/s":>12}{"steps/s":>9}')
  for kind, threads, steps, n, sec in rows:
    print(f'{kind:<15}{threads:>8}{steps:>8}{n:>10}{sec:>9.2f}{n / sec:>12.0f}{steps / sec:>9.1f}')


if __name__ == '__main__':
  main()
