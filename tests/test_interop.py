"""Public-code ImageTextModel state dicts in and out, checked against a torch build.

The torch reference here is written from REFERENCE 3 with the public code's module names
(img_model.conv1/bn1/layerN.M.*/fc1, text_model.bert = transformers' BertModel,
text_model.classifier, an unused top-level classifier), so its state_dict() has the public
checkpoint's keys; its forward is the public model's eval-mode forward.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetmi_jax.models import (build_model, load_reference_checkpoint,
                                 save_reference_checkpoint, state_dict_to_variables,
                                 variables_to_state_dict)
from forgetmi_jax.models.interop import NOT_IN_REFERENCE, read_reference_state_dict

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tnn = torch.nn
from tests.torch_reference import BasicBlock  # noqa: E402  (after the torch skip)

TEXT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16)
# 64 px: stride-4 stem -> 16, two stride-2 stages -> 4x4x8, 2x2 average pool -> 2x2x8 = 32.
TINY_IMAGE = dict(preset='', stem_channels=4, stem_kernel=7, stem_stride=4,
                  stage_channels=(4, 8), blocks_per_stage=2, pool='fixed', embed_dim=32)
TINY = {'image': TINY_IMAGE, 'text': TEXT, 'fusion': {'variant': 'reference'}, 'num_classes': 4}
# The exact reference network (7 stages, 8..192 channels, 2048 px -> 192x2x2 = 768).
PAPER = {'image': {'preset': 'paper', 'embed_dim': 768}, 'text': TEXT,
         'fusion': {'variant': 'reference'}, 'num_classes': 4}


class _ImageResNet(tnn.Module):
  def __init__(self, stem, channels, blocks, embed, classes):
    super().__init__()
    self.conv1 = tnn.Conv2d(1, stem, 7, 4, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(stem)
    cin = stem
    for i, ch in enumerate(channels):
      setattr(self, f'layer{i + 1}', tnn.Sequential(
          *[BasicBlock(cin if j == 0 else ch, ch, 2 if j == 0 else 1) for j in range(blocks)]))
      cin = ch
    self.num_stages = len(channels)
    self.avgpool = tnn.AvgPool2d((2, 2))
    self.fc1 = tnn.Linear(embed, classes)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    z = torch.flatten(self.avgpool(x), 1)
    return z, self.fc1(z)


class _TextBert(tnn.Module):
  def __init__(self, config):
    super().__init__()
    self.bert = transformers.BertModel(config)
    self.dropout = tnn.Dropout(config.hidden_dropout_prob)
    self.classifier = tnn.Linear(config.hidden_size, 4)

  def forward(self, ids, mask):
    pooled = self.dropout(self.bert(input_ids=ids, attention_mask=mask,
                                    token_type_ids=torch.zeros_like(ids)).pooler_output)
    return pooled, self.classifier(pooled)


class _ImageTextModel(tnn.Module):
  def __init__(self, image):
    super().__init__()
    config = transformers.BertConfig(**TEXT, hidden_act='gelu', layer_norm_eps=1e-12)
    self.text_model = _TextBert(config)
    stem, channels = image.get('stem_channels', 8), image.get('stage_channels')
    channels = channels or (8, 16, 32, 64, 128, 192, 192)
    self.img_model = _ImageResNet(stem, channels, image.get('blocks_per_stage', 2),
                                  image['embed_dim'], 4)
    self.classifier = tnn.Linear(config.hidden_size, 4)  # in the public model, never called

  def forward(self, img, ids, mask):
    z_img, logits_img = self.img_model(img)
    z_txt, logits_txt = self.text_model(ids, mask)
    return z_img, logits_img, z_txt, logits_txt


def _reference(image, seed=0):
  """The torch model in eval mode with every norm layer's weights and statistics random."""
  torch.manual_seed(seed)
  model = _ImageTextModel(image)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (tnn.BatchNorm2d, tnn.LayerNorm)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
      if isinstance(module, tnn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.num_batches_tracked.fill_(7)
  return model.eval()


def _template(model, image_size, seed=1):
  """Random {'params', 'batch_stats'} of our model's structure (no init compile)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 1)),
      jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), train=False))
  rng = np.random.default_rng(seed)
  fill = lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32))  # noqa: E731
  return {k: jax.tree.map(fill, shapes[k]) for k in ('params', 'batch_stats')}


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _inputs(image_size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(2, image_size, image_size, 1)).astype(np.float32)
  ids = rng.integers(1, TEXT['vocab_size'], size=(2, 10)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0  # real padding
  return images, ids, mask


def _compare(config, image_size):
  """Our eval-mode outputs vs the torch reference's, on the same weights."""
  ref = _reference(config['image'])
  model, _, _ = build_model(config)
  variables = state_dict_to_variables(_state_dict(ref), _template(model, image_size))
  images, ids, mask = _inputs(image_size)
  args = (variables, jnp.asarray(images), jnp.asarray(ids, jnp.int32),
          jnp.asarray(mask, jnp.int32))
  # One run: on CPU compile with LLVM optimisation off (40% less compile, same values to
  # float rounding), as init_variables does.
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  forward = jax.jit(lambda v, x, i, m: model.apply(v, x, i, m, train=False))
  out = forward.lower(*args).compile(compiler_options=options)(*args)
  with torch.no_grad():
    expected = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(ids), torch.from_numpy(mask))
  for name, value in zip(('z_img', 'logits_img', 'z_txt', 'logits_txt'), expected):
    value = value.numpy()
    assert np.abs(value).max() > 1e-2, name  # not a degenerate all-zero comparison
    np.testing.assert_allclose(np.asarray(getattr(out, name)), value, rtol=1e-4, atol=1e-4,
                               err_msg=name)
  return ref


def test_paper_network_at_2048_matches_public_model():
  """The exact reference ResNet (7 stages) at 2048x2048 + a tiny BERT, ported weights."""
  ref = _compare(PAPER, 2048)
  # The torch build is the reference's image network: REFERENCE 3's 3.31M parameters.
  assert sum(p.numel() for p in ref.img_model.parameters()) == 3_313_548


def test_import_keeps_fusion_and_joint_head_and_says_so(caplog):
  ref = _reference(TINY_IMAGE)
  model, _, _ = build_model(TINY)
  template = _template(model, 64)
  with caplog.at_level(logging.WARNING, logger='forgetmi_jax.models.interop'):
    variables = state_dict_to_variables(_state_dict(ref), template)
  assert any('fusion and joint_head are kept as freshly initialised' in r.getMessage()
             for r in caplog.records)
  assert NOT_IN_REFERENCE == ('fusion', 'joint_head')
  for name in NOT_IN_REFERENCE:
    for a, b in zip(jax.tree.leaves(variables['params'][name]),
                    jax.tree.leaves(template['params'][name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 'beta' in variables['params']['fusion']  # the 'reference' MAG's learnable scalar
  exported = variables_to_state_dict(variables)
  assert not any(k.startswith(('fusion', 'joint_head')) for k in exported)
  # Every other leaf was replaced: nothing of the random template survives there.
  flat_new = jax.tree_util.tree_leaves_with_path(variables)
  flat_old = dict(jax.tree_util.tree_leaves_with_path(template))
  for path, leaf in flat_new:
    if path[1].key not in NOT_IN_REFERENCE:
      assert not np.array_equal(np.asarray(leaf), np.asarray(flat_old[path])), path


def test_export_import_round_trip_is_bitwise_and_loads_into_torch():
  model, _, _ = build_model(TINY)
  variables = _template(model, 64, seed=3)
  exported = variables_to_state_dict(variables)
  other = _template(model, 64, seed=4)
  back = state_dict_to_variables(exported, other)
  for (pa, a), (pb, b), (_, c) in zip(*(jax.tree_util.tree_leaves_with_path(t)
                                        for t in (variables, back, other))):
    assert pa == pb
    expected = c if pa[1].key in NOT_IN_REFERENCE else a  # those stay as in the template
    assert np.asarray(expected).tobytes() == np.asarray(b).tobytes(), pa
  # Public names and torch layouts: the torch build loads it with only the unused
  # classifier missing (BatchNorm fills in a missing num_batches_tracked itself) and then
  # holds exactly the exported tensors.
  ref = _reference(TINY_IMAGE)
  result = ref.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                               strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == ['classifier.bias', 'classifier.weight']
  again = {k: v for k, v in _state_dict(ref).items() if k in exported}
  assert again.keys() == exported.keys()
  for k in exported:
    assert again[k].tobytes() == exported[k].tobytes(), k
  # state dict -> variables -> state dict gives the public tensors back exactly.
  public = _state_dict(_reference(TINY_IMAGE, seed=5))
  round_trip = variables_to_state_dict(state_dict_to_variables(public, variables))
  for k, v in round_trip.items():
    assert v.tobytes() == public[k].tobytes(), k
  assert set(public) - set(round_trip) == {k for k in public if k.endswith(
      'num_batches_tracked') or k.startswith('classifier.')}


def test_missing_unexpected_and_misshaped_keys_in_one_error():
  model, _, _ = build_model(TINY)
  state = _state_dict(_reference(TINY_IMAGE))
  del state['img_model.layer2.0.downsample.1.running_var']
  del state['text_model.bert.pooler.dense.bias']
  state['img_model.layer3.0.conv1.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  state['text_model.classifier.weight'] = np.zeros((3, 32), np.float32)
  state['img_model.conv1.weight'] = np.zeros((4, 1, 5, 5), np.float32)
  with pytest.raises(ValueError) as info:
    state_dict_to_variables(state, _template(model, 64))
  msg = str(info.value)
  for text in ('missing keys', 'img_model.layer2.0.downsample.1.running_var (8,)',
               'text_model.bert.pooler.dense.bias (32,)',
               'unexpected keys', 'img_model.layer3.0.conv1.weight (8, 8, 3, 3)',
               'mis-shaped keys', 'text_model.classifier.weight: got (3, 32), expected (4, 32)',
               'img_model.conv1.weight: got (4, 1, 5, 5), expected (4, 1, 7, 7)'):
    assert text in msg, text


def test_image_projection_has_no_public_equivalent():
  model, _, _ = build_model({**TINY, 'image': {**TINY_IMAGE, 'embed_dim': 16}})
  template = _template(model, 64)
  assert 'projection' in template['params']['image_encoder']
  with pytest.raises(ValueError, match='image_encoder/projection/kernel'):
    variables_to_state_dict(template)


def test_checkpoint_files_pth_and_safetensors(tmp_path):
  ref = _reference(TINY_IMAGE, seed=2)
  # DataParallel prefix inside a {'state_dict': ...} wrapper, as torch.save writes it.
  # Older transformers also saved the position_ids buffer and named LayerNorm gamma/beta.
  state = {f'module.{k}': v for k, v in ref.state_dict().items()}
  state['module.text_model.bert.embeddings.position_ids'] = torch.arange(16)[None]
  for leaf, legacy in (('weight', 'gamma'), ('bias', 'beta')):
    name = 'module.text_model.bert.encoder.layer.1.output.LayerNorm.'
    state[name + legacy] = state.pop(name + leaf)
  wrapped = {'state_dict': state, 'epoch': 3}
  pth = tmp_path / 'model_state_dict.pth'
  torch.save(wrapped, pth)
  variables = load_reference_checkpoint(str(pth), TINY, image_size=64, rng=jax.random.PRNGKey(3))
  # Every public tensor landed (bitwise; the forward on such weights is checked above).
  public = _state_dict(ref)
  loaded = variables_to_state_dict(variables)
  assert set(public) - set(loaded) == {k for k in public if k.endswith(
      'num_batches_tracked') or k.startswith('classifier.')}
  for k, v in loaded.items():
    assert v.tobytes() == public[k].tobytes(), k
  # Our export as .safetensors (default suffix) and .pth reads back to the same tensors.
  st = save_reference_checkpoint(variables, tmp_path / 'export')
  assert st.endswith('export.safetensors')
  pt = save_reference_checkpoint(variables, tmp_path / 'export.pth')
  exported = variables_to_state_dict(variables)
  for path in (st, pt):
    state = read_reference_state_dict(path)
    assert state.keys() == exported.keys()
    for k in exported:
      assert state[k].tobytes() == exported[k].tobytes(), (path, k)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'export.pth', 'export.safetensors', 'model_state_dict.pth']  # no temp files left
  # The .safetensors export loads back to the same variables (fusion and joint_head drawn
  # from the same rng), given a run config this time.
  run_config = {'model': TINY, 'data': {'image_size': 64}}
  again = load_reference_checkpoint(st, run_config, rng=jax.random.PRNGKey(3))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # weights_only: a pickle with arbitrary objects is refused, not executed.
  bad = tmp_path / 'bad.pth'
  torch.save({'state_dict': {'x': torch.zeros(1)}, 'args': BasicBlock(1, 1, 1)}, bad)
  with pytest.raises(Exception, match='(?i)weights.only|unpickl'):
    read_reference_state_dict(str(bad))
  with pytest.raises(ValueError, match='image_size'):
    load_reference_checkpoint(str(pth), TINY)


def test_bfloat16_safetensors_read_as_float32(tmp_path):
  from safetensors.torch import save_file
  t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
  save_file({'img_model.fc1.weight': t}, str(tmp_path / 'w.safetensors'))
  state = read_reference_state_dict(str(tmp_path / 'w.safetensors'))
  assert state['img_model.fc1.weight'].dtype == np.float32
  np.testing.assert_array_equal(state['img_model.fc1.weight'], np.arange(6).reshape(2, 3))
