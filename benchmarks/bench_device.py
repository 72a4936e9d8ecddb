"""The Forget-MI step on whatever backend JAX finds: time, XLA FLOPs, achieved TFLOP/s and MFU,
float32 vs bfloat16, full-length vs realistic text; and the input path's examples/s (host
pipeline vs device-resident data).

  python benchmarks/bench_device.py                      # sizes and batches for the backend
  python benchmarks/bench_device.py --sizes paper --batches 4,8,16 --peak-tflops 989

Defaults (CPU_RUNS / ACCEL_RUNS below): CPU: tiny at batch 16 (float32 live and cached,
bfloat16 cached; full text only: nearly every report is cut at 32 tokens, so 'real' equals
'full') and mid at batch 4 (cached; float32 and bfloat16, full and real text): 7 compilations
of 10-50 s on XLA:CPU (10 minutes in all measured at load 4-6 on 2 cores; about 3 expected
idle). GPU/TPU: paper size at batch 4, 8, 16 (float32 cached full; bfloat16 cached full and
real, live full). Flags replace the plan by the product of the values given.
- path 'live': the frozen original runs inside the step; 'cached': its outputs are inputs.
- text 'full': every position real; 'real': report lengths drawn from the synthetic cohort's
  (see bench_unlearn_step.py), each batch cut to the multiple of 32 at or above its longest
  report (forgetmi_jax.data.trim).
- FLOPs: XLA's count for the compiled step (cost_analysis). MFU = achieved FLOP/s / peak;
  the peak is --peak-tflops, else 989 TFLOP/s (bf16 dense) on H100/H200, else 'n/a'. Both
  dtypes are compared with the same (bf16) peak.
- Batches are put on the device before timing: the step alone is timed; the input path is
  timed separately (host: ExampleSource.get_batch from uint16 images, as the MIMIC-CXR reader
  does, + transfer; device: DeviceSource.gather by index).
The step is the package's (benchmarks/_step.py:package_step lists the calls it makes).

Then, through the package's own runners (`--runs`, default 'grid,whole'; '' skips them), on the
synthetic cohort at the backend's size (CPU: the smoke config; GPU/TPU: the paper's size,
bench_ablation.PAPER_SIZE), unlearning from fresh variables (no original is trained first):
- grid: the 5 paper settings as 5 stacked copies of one program against 5 sequential runs
  (bench_ablation.bench, --grid-epochs epochs each);
- whole: the paper's 10 % Forget-MI run (`method=forgetmi_paper`: 30 epochs, no stopping),
  its wall time from the first compilation to the last checkpoint.
"""
import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _step as S  # noqa: E402
from forgetmi_jax.data.cohort import Cohort  # noqa: E402
from forgetmi_jax.data.device_data import DeviceSource  # noqa: E402
from forgetmi_jax.data.pipeline import ExampleSource  # noqa: E402
from forgetmi_jax.data.trim import length_buckets, trim_batch  # noqa: E402

PEAKS = {'H100': 989.0, 'H200': 989.0}  # TFLOP/s, bf16 dense (NVIDIA's figures)
# Default runs (size, batch, dtype, path, text); any of --sizes/--batches/--dtypes/--paths/
# --texts replaces them by the full product of the lists given (the rest from these).
CPU_RUNS = [('tiny', 16, 'float32', 'live', 'full'), ('tiny', 16, 'float32', 'cached', 'full'),
            ('tiny', 16, 'bfloat16', 'cached', 'full'),
            ('mid', 4, 'float32', 'cached', 'full'), ('mid', 4, 'float32', 'cached', 'real'),
            ('mid', 4, 'bfloat16', 'cached', 'full'), ('mid', 4, 'bfloat16', 'cached', 'real')]
ACCEL_RUNS = [('paper', b, d, p, t) for b in (4, 8, 16) for d, p, t in (
    ('float32', 'cached', 'full'), ('bfloat16', 'cached', 'full'),
    ('bfloat16', 'cached', 'real'), ('bfloat16', 'live', 'full'))]


def peak_tflops(flag):
  if flag:
    return float(flag)
  kind = jax.devices()[0].device_kind
  for name, peak in PEAKS.items():
    if name in kind:
      return peak
  return None


def time_step(size, batch, dtype, path, text, lengths, steps, variables):
  """Median step seconds, mean XLA GFLOP per step, compile seconds and the text lengths."""
  model, _ = S.jax_model(size, dtype)
  step, state, hp, add_targets = S.package_step(model, variables)
  batches = [S.step_batch(size, batch, lengths if text == 'real' else None, seed=i)
             for i in range(steps)]
  if text == 'real':
    buckets = length_buckets(S.SIZES[size]['tokens'], kind='multiple', multiple=32)
    batches = [trim_batch(b, buckets) for b in batches]
  if path == 'cached':
    batches = [add_targets(b) for b in batches]
  batches = [jax.device_put(b) for b in batches]
  original = jax.device_put(variables)
  programs, flops = {}, []
  t0 = time.time()
  for b in batches:
    n = b['forget']['input_ids'].shape[1]
    if n not in programs:
      c = step.lower(state, original, b, jax.random.PRNGKey(3), hp).compile()
      programs[n] = (c, S.xla_cost(c)[0])
      jax.block_until_ready(c(state, original, b, jax.random.PRNGKey(3), hp))  # warm-up
    flops.append(programs[n][1])
  compile_s = time.time() - t0
  times = []
  for i, b in enumerate(batches):
    c = programs[b['forget']['input_ids'].shape[1]][0]
    t0 = time.time()
    state, m = c(state, original, b, jax.random.PRNGKey(4 + i), hp)
    jax.block_until_ready(m)
    times.append(time.time() - t0)
  gflop = float(np.mean(flops)) / 1e9 if all(f is not None for f in flops) else None
  return float(np.median(times)), gflop, compile_s, sorted(programs)


class _Uint16Images:
  """In-memory uint16 images read like the MIMIC-CXR array_record reader: k / 65535."""

  def __init__(self, q):
    self.q = q
    self.shape = q.shape

  def __len__(self):
    return len(self.q)

  def __getitem__(self, idx):
    return self.q[np.asarray(idx)].astype(np.float32) / 65535.0


def input_path(size, batch, num_images, steps):
  """examples/s of (host get_batch + transfer) and (device gather) over random batches."""
  s = S.SIZES[size]
  rng = np.random.default_rng(0)
  q = rng.integers(0, 65536, (num_images, s['image'], s['image'], 1), dtype=np.uint16)
  n = num_images
  cohort = Cohort(images=_Uint16Images(q), reports=[''] * n, labels=rng.integers(0, 4, n),
                  subject_id=np.arange(n), study_id=np.arange(n),
                  dicom_id=[str(i) for i in range(n)], fold=np.array(['1'] * n))
  ids = rng.integers(5, 1000, (n, s['tokens'])).astype(np.int32)
  source = ExampleSource(cohort, ids, np.ones_like(ids))
  dev = DeviceSource.from_source(source, dtype='uint16')
  draws = [rng.choice(n, batch, replace=False) for _ in range(steps + 1)]
  jax.block_until_ready(jax.device_put(source.get_batch(draws[0])))
  jax.block_until_ready(dev.get_batch(draws[0]))  # compiles the gather
  t0 = time.time()
  for d in draws[1:]:
    jax.block_until_ready(jax.device_put(source.get_batch(d)))
  host = steps * batch / (time.time() - t0)
  t0 = time.time()
  for d in draws[1:]:
    jax.block_until_ready(dev.get_batch(d))
  device = steps * batch / (time.time() - t0)
  return host, device


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--sizes', default='', help='default: tiny,mid on CPU, paper elsewhere')
  ap.add_argument('--batches', default='', help='default: the backend plan (see docstring)')
  ap.add_argument('--dtypes', default='', help='default: the backend plan')
  ap.add_argument('--paths', default='', help='default: the backend plan')
  ap.add_argument('--texts', default='', help='default: the backend plan')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--peak-tflops', default='', help='peak for MFU (default: H100/H200 989)')
  ap.add_argument('--runs', default='grid,whole', help="'grid', 'whole' or '' (see above)")
  ap.add_argument('--grid-epochs', type=int, default=2)
  ap.add_argument('--input-images', type=int, default=0,
                  help='images in the input-path test (default: 1 GB of uint16, 16..1024)')
  args = ap.parse_args()
  backend = jax.default_backend()
  runs = CPU_RUNS if backend == 'cpu' else ACCEL_RUNS
  given = {i: getattr(args, name).split(',') for i, name in
           enumerate(('sizes', 'batches', 'dtypes', 'paths', 'texts')) if getattr(args, name)}
  if given:
    lists = [given.get(i, sorted({str(r[i]) for r in runs})) for i in range(5)]
    runs = [(s, int(b), d, p, t) for s, b, d, p, t in itertools.product(*lists)]
  peak = peak_tflops(args.peak_tflops)
  lengths = S.synthetic_report_lengths()
  load = os.getloadavg()
  print(f'backend {backend}: {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{os.cpu_count()} cpus, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; '
        f"MFU peak {f'{peak:g} TFLOP/s' if peak else 'n/a'}")
  print(f"'real' text: {S.describe_lengths(lengths)}")
  print('| size | batch/set | dtype | path | text | tokens | step s | compile s | GFLOP/step | '
        'TFLOP/s | MFU | load |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  variables = {}
  for size, batch, dtype, path, text in runs:
    if size not in variables:  # the same float32 parameters for both compute dtypes
      variables = {size: S.jax_model(size)[1]()}
    shorter = np.mean(lengths < S.SIZES[size]['tokens'])
    if text == 'real' and shorter ** batch < 0.01:  # P(a whole batch is shorter than max)
      print(f'| {size} | {batch} | {dtype} | {path} | real | = full ({100 * shorter:.0f} % of '
            f"reports are shorter than {S.SIZES[size]['tokens']} tokens) | | | | | | |")
      continue
    try:
      sec, gflop, comp, lens = time_step(size, batch, dtype, path, text, lengths, args.steps,
                                         variables[size])
    except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
      print(f'| {size} | {batch} | {dtype} | {path} | {text} | — | failed: '
            f'{type(e).__name__}: {str(e)[:80]} | | | | | |', flush=True)
      continue
    tflops = gflop / 1e3 / sec if gflop else None
    mfu = f'{100 * tflops / peak:.1f} %' if peak and tflops else 'n/a'
    print(f"| {size} | {batch} | {dtype} | {path} | {text} | {','.join(map(str, lens))} | "
          f"{sec:.3f} | {comp:.0f} | {gflop:.1f} | {tflops:.3f} | {mfu} | "
          f'{os.getloadavg()[0]:.1f} |', flush=True)
  print()
  print('| size | batch | images | host pipeline examples/s | device gather examples/s |')
  print('|---|---|---|---|---|')
  for size, batch in sorted({(r[0], r[1]) for r in runs}):
    n = args.input_images or int(np.clip(2 ** 30 // (2 * S.SIZES[size]['image'] ** 2),
                                         max(16, batch), 1024))
    host, device = input_path(size, batch, n, steps=20)
    print(f'| {size} | {batch} | {n} | {host:,.0f} | {device:,.0f} |', flush=True)
  runs_wanted = [r for r in args.runs.split(',') if r]
  if runs_wanted:
    whole_runs(runs_wanted, 'tiny' if backend == 'cpu' else 'paper', args.grid_epochs)


def whole_runs(wanted, size, grid_epochs):
  """The stacked 5-setting grid against 5 sequential runs, and the paper's whole 10 % run."""
  import tempfile
  from benchmarks import bench_ablation
  from forgetmi_jax.runs import setup
  root = tempfile.mkdtemp(prefix='bench_device_')
  args = argparse.Namespace(default_epochs=grid_epochs, workdir=root)
  print()
  print('| run | size | copies x epochs | stacked s | sequential s | speed-up |')
  print('|---|---|---|---|---|---|')
  if 'grid' in wanted:
    r = bench_ablation.bench(size, args, train_original=False)
    n = len(bench_ablation.SETTINGS)
    print(f"| 5-setting grid | {size} | {n} x {r['epochs']} | {r['vmap']:.1f} | {r['seq']:.1f} | "
          f"{r['seq'] / r['vmap']:.2f}x |", flush=True)
  if 'whole' in wanted:
    config = bench_ablation.make_config(size, 30, os.path.join(root, 'whole'))
    with config.unlocked():
      config.method, config.stop.rule = 'forgetmi_paper', 'none'
    prep = setup.prepare(config, 'bench_device_whole')
    ctx = setup.make_context(prep, name='forgetmi_paper')  # noisy reports: before the clock
    t = time.perf_counter()
    result = setup.run_method(prep, prep.init_variables(0), 'forgetmi_paper', ctx=ctx,
                              ckpt_root=os.path.join(root, 'ckpt'))
    seconds = time.perf_counter() - t
    steps = sum(e['steps'] for e in result.histories[0])
    print(f'| paper\'s 10 % Forget-MI | {size} | 1 x {config.forgetmi_paper.epochs} '
          f'({steps} steps) | {seconds:.1f} | | |', flush=True)


if __name__ == '__main__':
  main()
