"""Late-fusion multimodal model: shapes, names, train/eval modes, gradients, build_model."""
import ml_collections
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from forgetmi_jax.models import (BertConfig, ModelOutputs, MultimodalModel, ResNetEncoder,
                                 build_model, init_variables, load_bert_params_into,
                                 resnet_preset)

B, SIZE, LEN = 3, 64, 32
TINY = {
    'image': {'preset': 'small64'},
    'text': {'pretrained_path': '', 'vocab_size': 1000, 'hidden_size': 128,
             'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 512,
             'max_position_embeddings': 64},
    'fusion': {'variant': 'per_sample', 'beta': 1.0, 'eps': 1e-6, 'dropout_rate': 0.1},
    'num_classes': 4,
}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.random((B, SIZE, SIZE, 1)), jnp.float32)
  ids = jnp.asarray(rng.integers(5, 1000, (B, LEN)), jnp.int32)
  mask = jnp.ones((B, LEN), jnp.int32).at[0, 20:].set(0)
  labels = jnp.asarray([0, 2, 3], jnp.int32)
  return images, ids, mask, labels


@pytest.fixture(scope='module')
def tiny():
  model, text_params, tokenizer = build_model(ml_collections.ConfigDict(TINY))
  assert text_params is None and tokenizer is None
  variables = init_variables(model, jax.random.PRNGKey(0), SIZE, LEN)
  return model, variables


@pytest.fixture(scope='module')
def evaluate(tiny):
  """One compiled eval-mode forward shared by the tests (no dropout rng passed)."""
  model, _ = tiny
  return jax.jit(lambda v, images, ids, mask: model.apply(v, images, ids, mask, train=False))


def test_names_shapes_and_hashable(tiny, evaluate):
  model, variables = tiny
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'image_encoder', 'text_encoder', 'fusion', 'image_head',
                                      'text_head', 'joint_head'}
  assert 'stage3_block1' in variables['params']['image_encoder']
  assert 'layer_1' in variables['params']['text_encoder']
  assert set(variables['batch_stats']) == {'image_encoder'}
  hash(model)  # dict fields are frozen so the module can be a jit static argument
  images, ids, mask, _ = _batch()
  out = evaluate(variables, images, ids, mask)
  assert isinstance(out, ModelOutputs)
  shapes = {k: getattr(out, k).shape for k in ('z_img', 'z_txt', 'z_uni', 'z_joint',
                                                'logits_img', 'logits_txt', 'logits_joint')}
  # build_model matches the image embedding width to the text's (dot-product ranking loss).
  assert shapes == {'z_img': (B, 128), 'z_txt': (B, 128), 'z_uni': (B, 256),
                    'z_joint': (B, 128), 'logits_img': (B, 4), 'logits_txt': (B, 4),
                    'logits_joint': (B, 4)}
  np.testing.assert_array_equal(out.z_uni, jnp.concatenate([out.z_img, out.z_txt], -1))
  # Heads are plain linear maps of the embeddings.
  p = variables['params']
  np.testing.assert_allclose(out.logits_img, out.z_img @ p['image_head']['kernel']
                             + p['image_head']['bias'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits_joint, out.z_joint @ p['joint_head']['kernel']
                             + p['joint_head']['bias'], rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_without_dropout_rng(tiny, evaluate):
  _, variables = tiny
  a, b = evaluate(variables, *_batch()[:3]), evaluate(variables, *_batch()[:3])
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_jitted_forward_backward_gives_finite_grads_for_every_param(tiny):
  model, variables = tiny
  images, ids, mask, labels = _batch()

  def loss_fn(params, batch_stats, rng):
    out, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images, ids,
                               mask, train=True, rngs={'dropout': rng},
                               mutable=['batch_stats'])
    ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        logits, labels).mean()
    return ce(out.logits_img) + ce(out.logits_txt) + ce(out.logits_joint), (out, mutated)

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (out, mutated)), grads = step(variables['params'], variables['batch_stats'],
                                       jax.random.PRNGKey(1))
  assert np.isfinite(loss)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree_util.tree_leaves(variables['params']))
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), f'{name} gets no gradient'
  # Train mode: BatchNorm statistics move; dropout acts on z_txt (pooler output).
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), mutated['batch_stats'],
                                 variables['batch_stats'])
  assert all(jax.tree_util.tree_leaves(moved))
  assert np.any(np.asarray(out.z_txt) == 0)


def test_resnet_instance_as_image_field_gives_same_tree(tiny):
  _, variables = tiny
  model = MultimodalModel(image=ResNetEncoder(**{**resnet_preset('small64'), 'embed_dim': 128}),
                          text=BertConfig(**{k: v for k, v in TINY['text'].items()
                                             if k != 'pretrained_path'}),
                          fusion=TINY['fusion'])
  images, ids, mask, _ = _batch()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids, mask,
                                             train=False))
  same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, shapes['params'],
                                variables['params'])
  assert all(jax.tree_util.tree_leaves(same))


def test_build_model_image_width_follows_text_unless_given():
  model, _, _ = build_model(TINY)
  assert model.image['embed_dim'] == 128
  model, _, _ = build_model({**TINY, 'image': {'preset': 'small64', 'embed_dim': 768}})
  assert model.image['embed_dim'] == 768
  paper = {**TINY, 'image': {'preset': 'paper'},
           'text': {'vocab_size': 31090, 'hidden_size': 768, 'num_hidden_layers': 1,
                    'num_attention_heads': 12, 'intermediate_size': 3072}}
  model, _, _ = build_model(paper)
  images = jax.ShapeDtypeStruct((1, 2048, 2048, 1), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda x, i: model.init(jax.random.PRNGKey(0), x, i, i, train=False),
                          images, ids)
  # With BERT-base width the reference ResNet stays exact: 768 = 192 * 2 * 2, no projection.
  assert 'projection' not in shapes['params']['image_encoder']
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      [shapes['params']['image_encoder'], shapes['params']['image_head']]))
  assert n == 3_313_548


def test_build_model_rejects_unknown_text_keys():
  cfg = {**TINY, 'text': {**TINY['text'], 'hiden_size': 64}}
  with pytest.raises(ValueError, match='hiden_size'):
    build_model(cfg)


def test_build_model_with_pretrained_folder(tmp_path):
  """A checkpoint folder sets the text architecture; its weights drop into fresh variables."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'edema', 'mild', 'no', '.']
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  transformers.BertTokenizerFast(vocab_file=str(tmp_path / 'vocab.txt')).save_pretrained(
      str(tmp_path))
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=16)).save_pretrained(str(tmp_path))
  cfg = {'image': {'preset': 'small32'},
         'text': {'pretrained_path': str(tmp_path), 'hidden_dropout_prob': 0.2},
         'fusion': {}, 'num_classes': 4}
  model, text_params, tokenizer = build_model(cfg)
  assert model.text.hidden_size == 16 and model.text.hidden_dropout_prob == 0.2
  enc = tokenizer(['mild edema .', 'no edema'], padding='max_length', max_length=8,
                  return_tensors='np')
  ids, mask = jnp.asarray(enc['input_ids']), jnp.asarray(enc['attention_mask'])
  images = jnp.zeros((2, 32, 32, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids, mask,
                                             train=False))
  variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  variables = load_bert_params_into(variables, text_params)
  out = jax.jit(lambda v: model.apply(v, images, ids, mask, train=False))(variables)
  ref = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    pooled = ref(input_ids=torch.tensor(enc['input_ids']),
                 attention_mask=torch.tensor(enc['attention_mask'])).pooler_output.numpy()
  np.testing.assert_allclose(out.z_txt, pooled, atol=1e-5)

