"""ResNet image encoder: exact reference size at 2048, names, pooling, parity with torch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.models.resnet import (ResNetEncoder, adaptive_avg_pool, resnet_block_names,
                                        resnet_preset)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _numpy_variables(module, x, seed=0):
  """Variables with the module's structure filled from numpy (skips slow XLA-CPU compiles
  of many threefry draws): He-scaled kernels, perturbed BN affine params and running stats."""
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, sd):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(sd.shape[:-1]))
      return jnp.asarray(rng.normal(size=sd.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
    if name in ('scale', 'var'):
      return jnp.asarray(1.0 + 0.1 * rng.random(sd.shape), jnp.float32)
    return jnp.asarray(0.1 * rng.normal(size=sd.shape), jnp.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _paper_shapes(batch=2):
  enc = ResNetEncoder(**resnet_preset('paper'))
  x = jax.ShapeDtypeStruct((batch, 2048, 2048, 1), jnp.float32)
  variables = jax.eval_shape(lambda x: enc.init(jax.random.PRNGKey(0), x, train=False), x)
  return enc, x, variables


def test_paper_parameter_count_with_head_is_exact():
  enc, _, variables = _paper_shapes()
  head = jax.eval_shape(lambda: nn.Dense(4).init(jax.random.PRNGKey(0), jnp.zeros((1, 768))))
  # REFERENCE 3: ResNet + 768->4 head, BN affine params included, running stats excluded.
  assert _count(variables['params']) + _count(head['params']) == 3_313_548
  assert set(variables) == {'params', 'batch_stats'}
  assert _count(variables['batch_stats']) > 0


def test_paper_shapes_at_2048():
  enc, x, variables = _paper_shapes()

  def run(v, x):
    return enc.apply(v, x, train=False, capture_intermediates=True, mutable=['intermediates'])

  out, state = jax.eval_shape(run, variables, x)
  assert out.shape == (2, 768)
  inter = state['intermediates']
  assert inter['stem_conv']['__call__'][0].shape == (2, 512, 512, 8)
  assert inter['stage6_block1']['__call__'][0].shape == (2, 4, 4, 192)  # then 2x2 pool -> 768


def test_block_names_match_param_tree():
  enc, _, variables = _paper_shapes()
  names = enc.block_names()
  assert names == resnet_block_names(7, 2)
  assert names[0] == 'stage0_block0' and names[-1] == 'stage6_block1' and len(names) == 14
  assert set(variables['params']) == {'stem_conv', 'stem_bn', *names}
  # Every stage is strided, so every first block has a 1x1 downsample; second blocks do not.
  for i in range(7):
    assert 'downsample_conv' in variables['params'][f'stage{i}_block0']
    assert 'downsample_conv' not in variables['params'][f'stage{i}_block1']


@pytest.mark.parametrize('preset,size', [('small64', 64), ('small128', 128), ('small32', 32)])
def test_small_presets_keep_768_embedding(preset, size):
  enc = ResNetEncoder(**resnet_preset(preset))
  out = jax.eval_shape(lambda: enc.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 1)), train=False)[0])
  assert out.shape == (2, 768)


def test_projection_when_embed_dim_differs():
  enc = ResNetEncoder(**{**resnet_preset('small32'), 'embed_dim': 96})
  out, v = jax.eval_shape(lambda: enc.init_with_output(
      jax.random.PRNGKey(0), jnp.ones((2, 32, 32, 1)), train=False))
  assert out.shape == (2, 96) and v['params']['projection']['kernel'].shape == (768, 96)


def test_unknown_preset_and_bad_input_raise():
  with pytest.raises(ValueError, match='unknown ResNet preset'):
    resnet_preset('nope')
  with pytest.raises(ValueError, match=r'\[B, H, W, 1\]'):
    jax.eval_shape(lambda: ResNetEncoder(**resnet_preset('small32')).init(
        jax.random.PRNGKey(0), jnp.ones((1, 32, 32)), train=False))


def test_real_run_64px_train_and_eval_modes():
  enc = ResNetEncoder(**resnet_preset('small64'))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 1))
  v = _numpy_variables(enc, x)
  out, new = jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable=['batch_stats']))(v, x)
  assert out.shape == (4, 768) and np.all(np.isfinite(out))
  # Train mode updates running statistics (momentum 0.9: new = 0.9 * old + 0.1 * batch).
  old_mean = v['batch_stats']['stem_bn']['mean']
  assert not np.allclose(new['batch_stats']['stem_bn']['mean'], old_mean)
  # Eval mode uses running stats: a sample's embedding does not depend on its batch mates.
  ev = jax.jit(lambda v, x: enc.apply(v, x, train=False))
  full = ev({'params': v['params'], **new}, x)
  single = ev({'params': v['params'], **new}, x[1:2])
  np.testing.assert_allclose(full[1:2], single, rtol=1e-5, atol=1e-5)
  # ... while in train mode (batch statistics) it does.
  tr = jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable=['batch_stats'])[0])
  assert not np.allclose(tr(v, x)[:2], tr(v, x[:2]), atol=1e-4)


@pytest.mark.parametrize('h,w,grid', [(5, 7, 2), (4, 4, 2), (6, 9, 3), (1, 1, 2)])
def test_adaptive_pool_matches_torch(h, w, grid):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  ours = adaptive_avg_pool(jnp.asarray(x), grid)
  ref = torch.nn.AdaptiveAvgPool2d(grid)(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def _torch_resnet(torch, kw):
  """An independent torch build of the same network (torchvision BasicBlock semantics)."""
  tnn = torch.nn

  from tests.torch_reference import BasicBlock as Block  # torch: a test-only dependency

  layers = [tnn.Conv2d(1, kw['stem_channels'], kw['stem_kernel'], kw['stem_stride'],
                       kw['stem_kernel'] // 2, bias=False),
            tnn.BatchNorm2d(kw['stem_channels']), tnn.ReLU()]
  cin = kw['stem_channels']
  for ch in kw['stage_channels']:
    for j in range(kw['blocks_per_stage']):
      layers.append(Block(cin if j == 0 else ch, ch, 2 if j == 0 else 1))
    cin = ch
  layers.append(tnn.AvgPool2d(2, 2) if kw['pool'] == 'fixed'
                else tnn.AdaptiveAvgPool2d(kw['pool_grid']))
  layers.append(tnn.Flatten())
  return tnn.Sequential(*layers)


def _copy_into_torch(torch, model, variables, kw):
  p, s = variables['params'], variables['batch_stats']

  def conv(t, k):
    t.weight.data = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())

  def bn(t, pp, ss):
    t.weight.data = torch.from_numpy(np.asarray(pp['scale']).copy())
    t.bias.data = torch.from_numpy(np.asarray(pp['bias']).copy())
    t.running_mean.data = torch.from_numpy(np.asarray(ss['mean']).copy())
    t.running_var.data = torch.from_numpy(np.asarray(ss['var']).copy())

  conv(model[0], p['stem_conv']['kernel'])
  bn(model[1], p['stem_bn'], s['stem_bn'])
  names = ResNetEncoder(**kw).block_names()
  for name, block in zip(names, model[3:3 + len(names)]):
    pb, sb = p[name], s[name]
    conv(block.conv1, pb['conv1']['kernel'])
    bn(block.bn1, pb['bn1'], sb['bn1'])
    conv(block.conv2, pb['conv2']['kernel'])
    bn(block.bn2, pb['bn2'], sb['bn2'])
    if block.downsample is not None:
      conv(block.downsample[0], pb['downsample_conv']['kernel'])
      bn(block.downsample[1], pb['downsample_bn'], sb['downsample_bn'])


@pytest.mark.parametrize('pool,size', [('fixed', 40), ('adaptive', 50)])
def test_matches_independent_torch_network(pool, size):
  """Same weights in a torch build give the same embeddings (padding, strides, BN, pool,
  channel-major flatten), in eval mode with perturbed running stats and in train mode."""
  torch = pytest.importorskip('torch')
  kw = dict(stem_channels=4, stem_kernel=7, stem_stride=2, stage_channels=(4, 8, 6),
            blocks_per_stage=2, pool=pool, pool_grid=2, embed_dim=None)
  enc = ResNetEncoder(**kw)
  x = jax.random.uniform(jax.random.PRNGKey(3), (3, size, size, 1))
  v = _numpy_variables(enc, x, seed=7)  # non-trivial BN affine params and running stats
  tm = _torch_resnet(torch, kw)
  _copy_into_torch(torch, tm, v, kw)
  xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref_eval = tm.eval()(xt).numpy()
    ref_train = tm.train()(xt).numpy()
  ours_eval = jax.jit(lambda v, x: enc.apply(v, x, train=False))(v, x)
  np.testing.assert_allclose(ours_eval, ref_eval, rtol=1e-4, atol=1e-5)
  ours_train, _ = jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable=['batch_stats']))(v, x)
  np.testing.assert_allclose(ours_train, ref_train, rtol=1e-4, atol=1e-5)
