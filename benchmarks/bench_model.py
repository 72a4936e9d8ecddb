"""Forward+backward time per sample of the full multimodal model (jitted, after warm-up).

  python benchmarks/bench_model.py                 # tiny and paper sizes
  python benchmarks/bench_model.py --sizes tiny    # skip the paper size (minutes on 2 cores)

One step = train-mode forward (dropout, batch-statistics BatchNorm) of images + texts, CE on the
image, text and joint logits, gradient w.r.t. all params. Also times an eval-mode forward (what
the frozen original costs). Median of --repeats runs after one warm-up call.
"""
import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from forgetmi_jax.models import build_model, init_variables

SIZES = {
    # REFERENCE 9's tiny config.
    'tiny': dict(image_size=64, text_len=32, batch=16, model={
        'image': {'preset': 'small64'},
        'text': dict(vocab_size=2000, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=512,
                     max_position_embeddings=512),
        'fusion': {'variant': 'per_sample'}, 'num_classes': 4}),
    # Paper: 2048x2048 reference ResNet, BERT-base with SciBERT's vocabulary, 320 tokens.
    'paper': dict(image_size=2048, text_len=320, batch=2, model={
        'image': {'preset': 'paper'},
        'text': dict(vocab_size=31090, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=512),
        'fusion': {'variant': 'per_sample'}, 'num_classes': 4}),
}


def _timed(fn, *args, repeats):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def bench(name, repeats, batch=None):
  spec = SIZES[name]
  batch = batch or spec['batch']
  model, _, _ = build_model(spec['model'])
  t = time.perf_counter()
  variables = init_variables(model, jax.random.PRNGKey(0), spec['image_size'], spec['text_len'],
                             batch=1)
  init_s = time.perf_counter() - t
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((batch, spec['image_size'], spec['image_size'], 1)),
                       jnp.float32)
  ids = jnp.asarray(rng.integers(5, spec['model']['text']['vocab_size'],
                                 (batch, spec['text_len'])), jnp.int32)
  mask = jnp.ones_like(ids)
  labels = jnp.asarray(rng.integers(0, 4, batch), jnp.int32)

  def loss_fn(params, batch_stats, key):
    out, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images, ids,
                               mask, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()  # noqa
    return ce(out.logits_img) + ce(out.logits_txt) + ce(out.logits_joint), mutated

  step = jax.jit(jax.grad(loss_fn, has_aux=True))
  forward = jax.jit(lambda v: model.apply(v, images, ids, mask, train=False).z_joint)
  compile_step, step_s = _timed(step, variables['params'], variables['batch_stats'],
                                jax.random.PRNGKey(1), repeats=repeats)
  compile_fwd, fwd_s = _timed(forward, variables, repeats=repeats)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))
  return dict(size=name, batch=batch, params_m=n_params / 1e6, init_s=init_s,
              first_step_s=compile_step, step_s=step_s, step_ms_per_sample=1e3 * step_s / batch,
              fwd_ms_per_sample=1e3 * fwd_s / batch,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='tiny,paper', help='comma separated: tiny, paper')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--paper-batch', type=int, default=2)
  args = parser.parse_args()
  rows = []
  for name in [s.strip() for s in args.sizes.split(',') if s.strip()]:
    if name not in SIZES:
      parser.error(f'unknown size {name!r} (known: {", ".join(SIZES)})')
    rows.append(bench(name, args.repeats if name == 'tiny' else max(1, args.repeats // 2),
                      args.paper_batch if name == 'paper' else None))
  print(f'backend: {jax.default_backend()} ({jax.device_count()} device(s)), jax {jax.__version__}')
  header = ('size', 'batch', 'params (M)', 'init s', 'first step s', 'step s (median)',
            'fwd+bwd ms/sample', 'eval fwd ms/sample', 'peak RSS GB')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in rows:
    print(f"| {r['size']} | {r['batch']} | {r['params_m']:.2f} | {r['init_s']:.1f} | "
          f"{r['first_step_s']:.1f} | {r['step_s']:.3f} | {r['step_ms_per_sample']:.1f} | "
          f"{r['fwd_ms_per_sample']:.1f} | {r['peak_rss_gb']:.1f} |")


if __name__ == '__main__':
  main()
