"""Forget-MI step time and peak memory at REFERENCE 9's sizes: the package's JAX step against
a PyTorch implementation of the same step (benchmarks/torch_step.py), run by this script on
the same machine, the same sizes and the same batches.

  python benchmarks/bench_unlearn_step.py [--sizes tiny,mid] [--batches 16] [--steps 3]
      [--paths live,cached] [--texts full,real] [--impls jax,torch] [--dtype float32]
      [--arch paper7|presets] [--check]
  python benchmarks/bench_unlearn_step.py --sizes paper --batches 4 --steps 2   # optional

Each (size, batch, path, text, implementation) runs in its own subprocess, so its peak RSS is
its own. torch runs with torch.set_num_threads(2) (--torch-threads); XLA uses every core.
- path 'live' runs the frozen original inside the step (noisy-forget and retain forwards);
  'cached' feeds its outputs, computed once (the main command's default).
- text 'full': every one of max_len positions is a real token. 'real': each report's length is
  drawn from the synthetic cohort's report lengths (measured at start-up: the default
  tokenizer on 300 subjects' reports, untruncated, then cut at max_len), the same draws for
  both implementations. JAX cuts each batch's text to the multiple of 32 at or above its
  longest report (forgetmi_jax.data.trim, one compilation per bucket, compiled before timing);
  torch (eager) cuts to the longest report exactly.
- arch 'paper7' (default): the paper's 7-stage ResNet at every size (what the public code
  runs), adaptive 2x2 pool; 'presets': the project's per-size encoders (small64, mid512).
Columns: median step time over --steps batches after warm-up, the ratio torch / JAX, each
worker's peak RSS (compilation included), XLA's plan, XLA's FLOP count and rate. A JAX step
whose plan exceeds --max-gb is compiled but not run.
--check first verifies that the two implementations compute the same step at the tiny size
(dropout off, JAX weights copied into torch): outputs, the four losses and the gradients.
"""
import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _step as S  # noqa: E402

# The public code's step on this machine kind (REFERENCE 9): (median s, peak GB), full text.
REFERENCE = {('paper', 4): (19.9, 9.3), ('paper', 8): (41.4, 16.7), ('paper', 16): (None, 32.0),
             ('mid', 16): (1.81, 1.9), ('tiny', 16): (0.198, 0.7)}


def peak_rss_gb():
  """This process's peak RSS (VmHWM: its own address space; getrusage's ru_maxrss would carry
  the parent's peak across fork + exec)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 2 ** 20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _batches(size, batch, text, steps, lengths_file):
  lengths = np.load(lengths_file) if text == 'real' else None
  return [S.step_batch(size, batch, lengths, seed=i) for i in range(steps)]


def jax_worker(size, batch, path, text, steps, max_gb, dtype, arch, lengths_file):
  import jax

  from forgetmi_jax.data.trim import length_buckets, trim_batch
  model, init = S.jax_model(size, dtype, arch)
  v = init()
  step, state, hp, add_targets = S.package_step(model, v)
  batches = _batches(size, batch, text, steps, lengths_file)
  if text == 'real':
    buckets = length_buckets(S.SIZES[size]['tokens'], kind='multiple', multiple=32)
    batches = [trim_batch(b, buckets) for b in batches]
  if path == 'cached':
    batches = [add_targets(b) for b in batches]
  t0 = time.time()
  compiled, gflops, plans = {}, [], []
  for b in batches:  # one program per text length
    key = b['forget']['input_ids'].shape[1]
    if key not in compiled:
      c = step.lower(state, v, b, jax.random.PRNGKey(3), hp).compile()
      compiled[key] = (c,) + S.xla_cost(c)
    c, flops, plan = compiled[key]
    gflops.append(flops / 1e9 if flops else None)
    plans.append(plan / 2 ** 30 if plan else None)
  compile_s = time.time() - t0
  xla_gb = max(p for p in plans) if all(plans) else None
  gflop = float(np.mean(gflops)) if all(gflops) else None
  lengths = sorted(compiled)
  if xla_gb is not None and xla_gb > max_gb:
    return {'compile_s': compile_s, 'median_s': None, 'xla_gb': xla_gb, 'gflop': gflop,
            'lengths': lengths, 'error': f'XLA plans {xla_gb:.1f} GB > {max_gb} GB'}
  for key, (c, _, _) in compiled.items():  # warm-up: one call per program
    b = next(b for b in batches if b['forget']['input_ids'].shape[1] == key)
    jax.block_until_ready(c(state, v, b, jax.random.PRNGKey(3), hp))
  times = []
  for i, b in enumerate(batches):
    c = compiled[b['forget']['input_ids'].shape[1]][0]
    t0 = time.time()
    state, m = c(state, v, b, jax.random.PRNGKey(4 + i), hp)
    jax.block_until_ready(m)
    times.append(time.time() - t0)
  return {'compile_s': compile_s, 'median_s': float(np.median(times)), 'xla_gb': xla_gb,
          'gflop': gflop, 'lengths': lengths}


def torch_worker(size, batch, path, text, steps, arch, lengths_file, threads):
  import torch

  from benchmarks.torch_step import ForgetMIStep
  from forgetmi_jax.data.trim import real_length
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  runner = ForgetMIStep(S.torch_model(size, arch))
  batches = _batches(size, batch, text, steps, lengths_file)
  trim = text == 'real'
  if path == 'cached':
    batches = [dict(b, targets=runner.targets(b, trim)) for b in batches]
  runner.step(batches[0], trim)  # warm-up
  times = []
  for b in batches:
    t0 = time.time()
    runner.step(b, trim)
    times.append(time.time() - t0)
  lengths = sorted({max(real_length(b['forget']['attention_mask']),
                        real_length(b['retain']['attention_mask'])) for b in batches})
  return {'median_s': float(np.median(times)), 'lengths': lengths}


def check(arch):
  """The torch step computes what the JAX step computes (tiny size, batch 4, dropout off)."""
  import jax
  import torch

  from benchmarks.torch_step import ForgetMIStep, _flat, load_flax_variables
  torch.set_num_threads(2)
  size = 'tiny'
  model, init = S.jax_model(size, arch=arch, dropout=False)
  v = init()
  runner = ForgetMIStep(S.torch_model(size, arch, dropout=False))
  load_flax_variables(runner.model, v)
  load_flax_variables(runner.original, v)
  b = S.step_batch(size, 4, lengths=np.array([9, 17, 25]), seed=1)
  x = b['retain']
  out = model.apply(v, x['image'], x['input_ids'], x['attention_mask'], train=False)
  runner.model.eval()
  with torch.no_grad():
    t_out = runner.model(torch.as_tensor(x['image']), torch.as_tensor(x['input_ids']).long(),
                         torch.as_tensor(x['attention_mask']).long())
  fwd = max(float(np.abs(np.asarray(getattr(out, k)) - t_out[k].numpy()).max()
                  / np.abs(np.asarray(getattr(out, k))).max())
            for k in ('z_img', 'z_txt', 'z_joint', 'logits_img', 'logits_txt', 'logits_joint'))
  step, state, hp, add_targets = S.package_step(model, v)
  bt = add_targets(b)
  grads, _, metrics = step.grads(state, v, bt, jax.random.PRNGKey(3), hp)
  targets = {k: np.asarray(t) for k, t in bt['targets'].items()}
  for k in ('forget_uni', 'forget_joint'):  # [B, 1, K, D] -> [K, B, D]
    targets[k] = np.swapaxes(targets[k][:, 0], 0, 1)
  terms = runner.losses(b, {k: torch.as_tensor(t) for k, t in targets.items()})
  term_err = max(abs(float(metrics[k]) - float(terms[k])) / abs(float(metrics[k]))
                 for k in ('ur', 'uu', 'mu', 'mr'))
  named = dict(runner.model.named_parameters())
  flat = _flat(grads)
  total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for _, g in flat))
  worst, where = 0.0, ''
  for path, g in flat:
    *mods, leaf = path
    name = '.'.join(mods) + '.' + {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight',
                                   'bias': 'bias'}[leaf]
    tg = named[name].grad
    t = np.zeros_like(g) if tg is None else tg.numpy()  # heads: no gradient in either
    if leaf == 'kernel':
      t = t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T
    norm = float(np.linalg.norm(g))
    if norm > 1e-6 * total:  # leaves whose exact gradient is 0 (key biases) are rounding
      err = float(np.linalg.norm(g - t)) / norm
      if err > worst:
        worst, where = err, name
  print(f'check ({arch}, tiny, batch 4, dropout off): outputs max rel. diff {fwd:.1e}, '
        f'losses {term_err:.1e}, gradients worst tensor rel. L2 {worst:.1e} ({where})')
  # The 7-stage encoder at 64 px runs BatchNorm over 1x1 maps (4 values per channel), which
  # amplifies float32 rounding in the image gradients; the project's presets agree to ~1e-5.
  limit = 5e-2 if arch == 'paper7' else 1e-3
  ok = fwd < 1e-4 and term_err < 1e-4 and worst < limit
  print('check', 'passed' if ok else f'FAILED (limits 1e-4, 1e-4, {limit})')
  return ok


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--sizes', default='tiny,mid')
  ap.add_argument('--batches', default='16')
  ap.add_argument('--paths', default='live,cached')
  ap.add_argument('--texts', default='full,real')
  ap.add_argument('--impls', default='jax,torch')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--max-gb', type=float, default=22.0,
                  help='skip running a JAX step whose compiled plan exceeds this')
  ap.add_argument('--dtype', default='float32', help='JAX compute dtype (torch: float32)')
  ap.add_argument('--arch', default='paper7', choices=('paper7', 'presets'))
  ap.add_argument('--check', action='store_true')
  ap.add_argument('--torch-threads', type=int, default=2,
                  help='torch.set_num_threads (its OpenMP threads spin: on a loaded machine '
                       'more threads than free cores slow it down several times)')
  ap.add_argument('--worker', nargs=6,
                  metavar=('IMPL', 'SIZE', 'BATCH', 'PATH', 'TEXT', 'LENGTHS'))
  args = ap.parse_args()
  if args.worker:
    impl, size, batch, path, text, lengths_file = args.worker
    if impl == 'jax':
      r = jax_worker(size, int(batch), path, text, args.steps, args.max_gb, args.dtype,
                     args.arch, lengths_file)
    else:
      r = torch_worker(size, int(batch), path, text, args.steps, args.arch, lengths_file,
                       args.torch_threads)
    r['peak_gb'] = peak_rss_gb()
    print(json.dumps(r))
    return
  import jax
  import torch
  if args.check and not check(args.arch):
    sys.exit(1)
  lengths = S.synthetic_report_lengths()
  fd, lengths_file = tempfile.mkstemp(suffix='.npy')
  os.close(fd)
  np.save(lengths_file, lengths)
  load = os.getloadavg()
  print(f'device: {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, load average '
        f'{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); jax '
        f'{jax.__version__}, torch {torch.__version__} ({args.torch_threads} threads); '
        f'JAX compute dtype {args.dtype}; image encoder {args.arch}')
  print(f"'real' text: {S.describe_lengths(lengths)}")
  print('| size | batch/set | path | text | tokens (JAX / torch) | JAX s | torch s | '
        'torch / JAX | JAX peak GB | torch peak GB | XLA plan GB | GFLOP/step | JAX GFLOP/s | '
        'public code s (REF 9) | load 1 min |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  fmt = lambda x, d=3: '—' if x is None else f'{x:.{d}f}'  # noqa: E731
  try:
    for size, batch, path, text in itertools.product(
        args.sizes.split(','), map(int, args.batches.split(',')), args.paths.split(','),
        args.texts.split(',')):
      res = {}
      for impl in args.impls.split(','):
        out = subprocess.run(
            [sys.executable, __file__, '--steps', str(args.steps), '--max-gb', str(args.max_gb),
             '--dtype', args.dtype, '--arch', args.arch, '--torch-threads',
             str(args.torch_threads), '--worker', impl, size, str(batch),
             path, text, lengths_file], capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        if out.returncode or not lines:
          res[impl] = {'median_s': None,
                       'error': (out.stderr.strip().splitlines() or ['?'])[-1][:80]}
        else:
          res[impl] = json.loads(lines[-1])
      j, t = res.get('jax', {}), res.get('torch', {})
      ratio = (f"{t['median_s'] / j['median_s']:.2f}x"
               if t.get('median_s') and j.get('median_s') else '—')
      rate = (j['gflop'] / j['median_s'] if j.get('gflop') and j.get('median_s') else None)
      toks = f"{','.join(map(str, j.get('lengths', []))) or '—'} / " \
             f"{','.join(map(str, t.get('lengths', []))) or '—'}"
      ref = REFERENCE.get((size, batch), (None, None))[0] if text == 'full' else None
      errors = '; '.join(f"{k}: {v['error']}" for k, v in res.items() if 'error' in v)
      print(f"| {size} | {batch} | {path} | {text} | {toks} | {fmt(j.get('median_s'))} | "
            f"{fmt(t.get('median_s'))} | {ratio} | {fmt(j.get('peak_gb'), 2)} | "
            f"{fmt(t.get('peak_gb'), 2)} | {fmt(j.get('xla_gb'), 2)} | {fmt(j.get('gflop'), 1)} "
            f"| {fmt(rate, 1)} | {fmt(ref, 2)} | {os.getloadavg()[0]:.1f} |"
            + (f' {errors}' if errors else ''), flush=True)
  finally:
    os.remove(lengths_file)
  load = os.getloadavg()
  print(f'load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}')


if __name__ == '__main__':
  main()
