"""Late-fusion CXR + report classifier (REFERENCE 3): ResNet image encoder, BERT text encoder,
MAG joint embedding, one linear head per embedding.

Submodule names are part of the API (unlearning methods select parameter subtrees by them):
image_encoder, text_encoder, fusion, image_head, text_head, joint_head.
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from forgetmi_jax.models.bert import BertConfig, BertModel, from_pretrained
from forgetmi_jax.models.fusion import MAG
from forgetmi_jax.models.resnet import ResNetEncoder, resnet_preset


@flax.struct.dataclass
class ModelOutputs:
  """Embeddings and logits of one forward. z_txt is the pooler output after dropout (train)."""
  z_img: jax.Array  # [B, Di]
  z_txt: jax.Array  # [B, Dt]
  z_uni: jax.Array  # [B, Di + Dt] = concat(z_img, z_txt)
  z_joint: jax.Array  # [B, Di]
  logits_img: jax.Array  # [B, num_classes]
  logits_txt: jax.Array
  logits_joint: jax.Array


def _module_kwargs(module: nn.Module) -> dict:
  """Dataclass fields of an unbound module, without flax's parent/name."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ('parent', 'name')}


class MultimodalModel(nn.Module):
  """(images [B,H,W,1], input_ids [B,L], attention_mask [B,L], train) -> ModelOutputs.

  `image` is a dict of ResNetEncoder kwargs (or a ResNetEncoder used as a template), `text` a
  BertConfig, `fusion` a dict of MAG kwargs. Dropout needs the 'dropout' rng only when
  train=True; BatchNorm statistics are in 'batch_stats' (mutable in train mode).
  `dtype` is the compute dtype (float32 or bfloat16): parameters, BatchNorm statistics and
  the optimiser stay float32; BatchNorm/LayerNorm statistics, the attention softmax, MAG's
  norms, the heads and every output are float32 whatever it is.
  """
  image: Any = None
  text: BertConfig = BertConfig()
  fusion: Optional[Mapping[str, Any]] = None
  num_classes: int = 4
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Freeze dict fields so the module stays hashable (jit static args, nn.remat, caches).
    for name in ('image', 'fusion'):
      value = getattr(self, name)
      if isinstance(value, Mapping):
        value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        object.__setattr__(self, name, flax.core.FrozenDict(value))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, input_ids, attention_mask, train: bool) -> ModelOutputs:
    image_kwargs = (_module_kwargs(self.image) if isinstance(self.image, ResNetEncoder)
                    else dict(self.image or {}))
    image_kwargs.setdefault('dtype', self.dtype)
    z_img = ResNetEncoder(**image_kwargs, name='image_encoder')(images, train=train)
    _, z_txt = BertModel(self.text, dtype=self.dtype, name='text_encoder')(
        input_ids, attention_mask, train=train)
    z_joint = MAG(**dict(self.fusion or {}), dtype=self.dtype, name='fusion')(
        z_img, z_txt, train=train)
    # Outputs in float32 whatever the compute dtype: losses, distances and the attack read
    # them. The heads (D -> 4) cost nothing, so they run in float32 on the float32 embeddings.
    z_img, z_txt, z_joint = (x.astype(jnp.float32) for x in (z_img, z_txt, z_joint))
    head = lambda name: nn.Dense(self.num_classes, dtype=jnp.float32, name=name)  # noqa: E731
    return ModelOutputs(
        z_img=z_img, z_txt=z_txt, z_uni=jnp.concatenate([z_img, z_txt], axis=-1),
        z_joint=z_joint, logits_img=head('image_head')(z_img),
        logits_txt=head('text_head')(z_txt), logits_joint=head('joint_head')(z_joint))


def init_variables(model: MultimodalModel, rng: jax.Array, image_size: int, text_len: int,
                   batch: int = 2) -> dict:
  """Fresh {'params', 'batch_stats'} from dummy inputs (eval mode, so no dropout rng).

  On CPU the init is compiled with LLVM optimisation off: XLA-CPU spends most of an init's
  compile on the dozens of threefry draws (15 s -> 5 s for the tiny model) and the program
  runs once, so its speed does not matter; the values are the same to float rounding.
  """
  images = jnp.zeros((batch, image_size, image_size, 1), jnp.float32)
  ids = jnp.zeros((batch, text_len), jnp.int32)
  init = jax.jit(lambda r: model.init(r, images, ids, jnp.ones_like(ids), train=False))
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  variables = init.lower(rng).compile(compiler_options=options)(rng)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


_DROPOUT_KEYS = ('hidden_dropout_prob', 'attention_probs_dropout_prob')
# The jnp scalar types themselves (float32 is MultimodalModel's default field value, so a
# float32 model built from a config equals, and hashes like, one built without it).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name):
  """`model.dtype` (a string) -> the jnp dtype; anything but COMPUTE_DTYPES is an error."""
  if not isinstance(name, str) or name not in COMPUTE_DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}')
  return COMPUTE_DTYPES[name]


def build_model(model_cfg):
  """Model config (ConfigDict or dict) -> (model, pretrained_text_params or None, tokenizer or None).

  image:  {preset: 'paper'|'small128'|'small64'|'small32', <ResNetEncoder kwargs overriding it>}
          or explicit kwargs with preset ''. Without an explicit embed_dim the image embedding
          is projected to the text hidden size (no projection when they already agree, e.g.
          'paper' with BERT-base: 768).
  text:   {pretrained_path: '' (random init from the BertConfig fields given) or a Hugging Face
          BERT folder (architecture from its config.json; only the dropout rates given here
          apply)}.
  fusion: MAG kwargs (variant, beta, eps, dropout_rate).
  dtype:  compute dtype, 'float32' (default) or 'bfloat16' (see MultimodalModel).
  Pretrained params go into fresh variables with `load_bert_params_into`.
  """
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  dtype = compute_dtype(cfg.get('dtype', 'float32'))
  image = dict(cfg.get('image') or {})
  preset = image.pop('preset', '')
  image = {**(resnet_preset(preset) if preset else {}), **image}
  if 'stage_channels' in image:
    image['stage_channels'] = tuple(image['stage_channels'])
  text = dict(cfg.get('text') or {})
  path = text.pop('pretrained_path', '') or ''
  known = {f.name for f in dataclasses.fields(BertConfig)}
  unknown = sorted(set(text) - known)
  if unknown:
    raise ValueError(f'model.text has unknown keys {unknown} (BertConfig fields: {sorted(known)})')
  text_params = tokenizer = None
  if path:
    bert, text_params, tokenizer = from_pretrained(path)
    text_cfg = dataclasses.replace(bert.config, **{k: text[k] for k in _DROPOUT_KEYS if k in text})
  else:
    text_cfg = BertConfig(**text)
  # The ranking loss compares image and text embeddings by dot product, so they share a
  # width: the image embedding follows the text encoder's hidden size unless set explicitly.
  if not image.get('embed_dim'):
    image['embed_dim'] = int(text_cfg.hidden_size)
  model = MultimodalModel(image=image, text=text_cfg, fusion=dict(cfg.get('fusion') or {}),
                          num_classes=int(cfg.get('num_classes', 4)), dtype=dtype)
  return model, text_params, tokenizer
