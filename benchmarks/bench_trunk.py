"""What a frozen trunk (forgetmi.trunk, unlearning/trunk.py) saves per step and per score, by
model size: a training step (CE over the three heads, train mode, forward + backward, the
repair's kind of step) and an eval forward (the validation score's), with the whole model
trained and with only the top after the cut, plus the one-off cost of the trunk's outputs.

  python benchmarks/bench_trunk.py [--sizes default,tiny,mid] [--cuts 2:1,1:0] [--batch 16]

'default' is the synthetic default's model (configs/base.py: fast64 ResNet, 2-layer BERT of
64); 'tiny' / 'mid' are REFERENCE 9's sizes (benchmarks/_step.py: the paper's 7-stage ResNet at
64 / 512 px). Inputs are random arrays (the cost does not depend on the pixels). Columns: median
ms per step (32 examples: batch forget + batch retain) and per 128-image eval forward, over
--steps calls after a warm-up; the trunk's one-off cost per image; top / full ratios.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _step as S  # noqa: E402
from forgetmi_jax.models.apply import forward  # noqa: E402
from forgetmi_jax.models.multimodal import build_model, init_variables  # noqa: E402
from forgetmi_jax.train.losses import heads_ce  # noqa: E402
from forgetmi_jax.unlearning import trunk as trunk_lib  # noqa: E402
from forgetmi_jax.unlearning.method import keep_frozen_stats, stop_frozen  # noqa: E402


def default_model():
  from configs import base
  c = base.get_config()
  model, _, _ = build_model(c.model.to_dict())
  size, tokens = int(c.data.image_size), int(c.data.max_text_len)
  return model, init_variables(model, jax.random.PRNGKey(0), size, tokens), size, tokens


def sized_model(name):
  model, init = S.jax_model(name)
  return model, init(), S.SIZES[name]['image'], S.SIZES[name]['tokens']


def inputs(rng, n, size, tokens):
  return {'image': jnp.asarray(rng.uniform(size=(n, size, size, 1)), jnp.float32),
          'input_ids': jnp.asarray(rng.integers(5, 1000, (n, tokens)), jnp.int32),
          'attention_mask': jnp.ones((n, tokens), jnp.int32)}


def median_ms(fn, args, steps):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def measure(model, variables, size, tokens, cut_k, batch, steps):
  """(step ms, eval ms, trunk ms per image) for the whole model (cut_k None) or a trunk."""
  rng = np.random.default_rng(0)
  step_inputs, eval_inputs = inputs(rng, 2 * batch, size, tokens), inputs(rng, 128, size, tokens)
  labels = jnp.asarray(rng.integers(0, 4, 2 * batch), jnp.int32)
  trainable = stats_trainable = None
  trunk_ms = 0.0
  if cut_k is not None:
    cut = trunk_lib.cut_modules(variables['params'], *cut_k)
    run = trunk_lib.outputs_fn(model.apply, cut)
    args = (variables['params'], variables['batch_stats'], eval_inputs)
    trunk_ms = median_ms(run, args, steps) / 128
    step_inputs = dict(step_inputs, trunk=run(variables['params'], variables['batch_stats'],
                                              step_inputs))
    eval_inputs = dict(eval_inputs, trunk=run(*args))
    holder = trunk_lib.Trunk(*cut_k, cut, {}, None)
    trainable = holder.trainable(variables['params'])
    stats_trainable = holder.trainable(variables['batch_stats'])

  @jax.jit
  def step(params, batch_stats, x):
    def loss(p):
      out, stats = forward(model.apply, stop_frozen(p, trainable), batch_stats, x, train=True,
                           rng=jax.random.PRNGKey(0))
      return jnp.mean(heads_ce(out, labels)), stats
    grads, stats = jax.grad(loss, has_aux=True)(params)
    return grads, keep_frozen_stats(batch_stats, stats, stats_trainable)

  @jax.jit
  def score(params, batch_stats, x):
    return forward(model.apply, params, batch_stats, x, train=False)[0].logits_img

  p, s = variables['params'], variables['batch_stats']
  return (median_ms(step, (p, s, step_inputs), steps),
          median_ms(score, (p, s, eval_inputs), steps), trunk_ms)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sizes', default='default,tiny,mid')
  ap.add_argument('--cuts', default='2:1,1:0', help='k_image:k_text pairs')
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--steps', type=int, default=5)
  a = ap.parse_args()
  cuts = [tuple(int(x) for x in c.split(':')) for c in a.cuts.split(',') if c]
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, batch {a.batch} + {a.batch}')
  print('| size | trained | step ms | eval ms / 128 | trunk ms / image | step top/full | '
        'eval top/full |')
  print('| :--- | :--- | ---: | ---: | ---: | ---: | ---: |')
  for name in a.sizes.split(','):
    model, variables, size, tokens = default_model() if name == 'default' else sized_model(name)
    full = measure(model, variables, size, tokens, None, a.batch, a.steps)
    print(f'| {name} | whole model | {full[0]:.1f} | {full[1]:.1f} | | | |', flush=True)
    for k in cuts:
      top = measure(model, variables, size, tokens, k, a.batch, a.steps)
      print(f'| {name} | last {k[0]} image blocks, {k[1]} text layers | {top[0]:.1f} | '
            f'{top[1]:.1f} | {top[2]:.3f} | {top[0] / full[0]:.2f} | {top[1] / full[1]:.2f} |',
            flush=True)


if __name__ == '__main__':
  main()
