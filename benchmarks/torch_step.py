"""A PyTorch implementation of the Forget-MI step (REFERENCE 3-4), written for the benchmarks
to compare against: the same model, losses and optimiser, in eager PyTorch (not the package).

Model: 1-channel ResNet of torchvision BasicBlocks (any stem / stage configuration; the paper's
7 stages by default), BERT (post-LN, erf GELU, pooler tanh + dropout), MAG with per-sample
norms, three linear heads. Step (one call of `ForgetMIStep.step`):
  f_o (eval mode, no grad): embeddings of the noisy forget copies and of the retain pairs
      (skipped with cached targets);
  f_u (train mode): UU, MU on the forget set, backward; UR, MR on the retain set, backward
      (the gradient is the sum, taken one set at a time as the JAX step does; BatchNorm
      statistics are updated forget then retain);
  AdamW (eps 1e-6, weight decay 0.01 off biases, LayerNorm and BatchNorm), heads frozen.
Module and parameter names mirror the flax model's, so `load_flax_variables` can copy a JAX
model's weights in (the benchmark checks that both give the same outputs, loss and update).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAPER_RESNET = dict(stem_channels=8, stem_kernel=7, stem_stride=4,
                    stage_channels=(8, 16, 32, 64, 128, 192, 192), blocks_per_stage=2,
                    pool='adaptive', pool_grid=2, embed_dim=None)


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = _bn(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = _bn(cout)
    self.has_down = stride != 1 or cin != cout
    if self.has_down:
      self.downsample_conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
      self.downsample_bn = _bn(cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.has_down:
      x = self.downsample_bn(self.downsample_conv(x))
    return F.relu(y + x)


class ResNetEncoder(nn.Module):
  """[B, 1, H, W] -> [B, D]; flatten is channel-major as in the flax model."""

  def __init__(self, stem_channels=8, stem_kernel=7, stem_stride=4,
               stage_channels=(8, 16, 32, 64, 128, 192, 192), blocks_per_stage=2,
               pool='adaptive', pool_grid=2, embed_dim=None):
    super().__init__()
    self.stem_conv = nn.Conv2d(1, stem_channels, stem_kernel, stem_stride, stem_kernel // 2,
                               bias=False)
    self.stem_bn = _bn(stem_channels)
    self.block_names = []
    cin = stem_channels
    for i, ch in enumerate(stage_channels):
      for j in range(blocks_per_stage):
        name = f'stage{i}_block{j}'
        self.add_module(name, BasicBlock(cin, ch, 2 if j == 0 else 1))
        self.block_names.append(name)
        cin = ch
    self.pool, self.pool_grid = pool, pool_grid
    out = cin * pool_grid * pool_grid
    self.projection = nn.Linear(out, embed_dim) if embed_dim and embed_dim != out else None

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    if self.pool == 'fixed':
      x = F.avg_pool2d(x, 2, 2)
    else:
      x = F.adaptive_avg_pool2d(x, self.pool_grid)
    x = x.flatten(1)
    return self.projection(x) if self.projection is not None else x


class BertEmbeddings(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.word_embeddings = nn.Embedding(c['vocab_size'], c['hidden_size'])
    self.position_embeddings = nn.Embedding(c['max_position_embeddings'], c['hidden_size'])
    self.token_type_embeddings = nn.Embedding(c.get('type_vocab_size', 2), c['hidden_size'])
    self.layer_norm = nn.LayerNorm(c['hidden_size'], eps=1e-12)
    self.dropout = nn.Dropout(c['hidden_dropout_prob'])

  def forward(self, ids):
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    x = self.word_embeddings(ids) + self.position_embeddings(pos) + \
        self.token_type_embeddings(torch.zeros_like(ids))
    return self.dropout(self.layer_norm(x))


class BertLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    h, f = c['hidden_size'], c['intermediate_size']
    self.heads = c['num_attention_heads']
    self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
    self.attention_output = nn.Linear(h, h)
    self.attention_layer_norm = nn.LayerNorm(h, eps=1e-12)
    self.intermediate, self.output = nn.Linear(h, f), nn.Linear(f, h)
    self.output_layer_norm = nn.LayerNorm(h, eps=1e-12)
    self.hidden_dropout = nn.Dropout(c['hidden_dropout_prob'])
    self.attn_dropout = nn.Dropout(c['attention_probs_dropout_prob'])

  def forward(self, x, bias):
    b, n, h = x.shape
    split = lambda t: t.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads) + bias
    probs = self.attn_dropout(torch.softmax(scores, dim=-1))
    ctx = (probs @ v).transpose(1, 2).reshape(b, n, h)
    x = self.attention_layer_norm(x + self.hidden_dropout(self.attention_output(ctx)))
    y = self.output(F.gelu(self.intermediate(x)))
    return self.output_layer_norm(x + self.hidden_dropout(y))


class Bert(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.embeddings = BertEmbeddings(c)
    self.num_layers = c['num_hidden_layers']
    for i in range(self.num_layers):
      self.add_module(f'layer_{i}', BertLayer(c))
    self.pooler = nn.Linear(c['hidden_size'], c['hidden_size'])
    self.dropout = nn.Dropout(c['hidden_dropout_prob'])

  def forward(self, ids, mask):
    x = self.embeddings(ids)
    bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
    for i in range(self.num_layers):
      x = getattr(self, f'layer_{i}')(x, bias)
    return self.dropout(torch.tanh(self.pooler(x[:, 0])))


class MAG(nn.Module):
  """Per-sample MAG (fixed beta, eps 1e-6), image dominant."""

  def __init__(self, d_img, d_txt, beta=1.0, eps=1e-6, dropout=0.1):
    super().__init__()
    self.gate = nn.Linear(d_img + d_txt, d_txt)
    self.displacement = nn.Linear(d_img + d_txt, d_img)
    self.layer_norm = nn.LayerNorm(d_img, eps=1e-5)
    self.dropout = nn.Dropout(dropout)
    self.beta, self.eps = beta, eps

  def forward(self, z_img, z_txt):
    g = torch.sigmoid(self.gate(torch.cat([z_img, z_txt], -1)))
    h = self.displacement(torch.cat([z_img, g * z_txt], -1))
    ratio = z_img.norm(dim=-1, keepdim=True) / (h.norm(dim=-1, keepdim=True) + self.eps)
    alpha = torch.clamp(self.beta * ratio, max=1.0)
    return self.dropout(self.layer_norm(z_img + alpha * h))


class MultimodalModel(nn.Module):
  """(images [B, H, W, 1] NHWC like the JAX batches, ids, mask) -> dict of embeddings/logits."""

  def __init__(self, image_kwargs, text_cfg, num_classes=4, fusion_dropout=0.1):
    super().__init__()
    image_kwargs = dict(image_kwargs)
    if not image_kwargs.get('embed_dim'):
      image_kwargs['embed_dim'] = text_cfg['hidden_size']
    self.image_encoder = ResNetEncoder(**image_kwargs)
    self.text_encoder = Bert(text_cfg)
    d = image_kwargs['embed_dim']
    self.fusion = MAG(d, text_cfg['hidden_size'], dropout=fusion_dropout)
    self.image_head = nn.Linear(d, num_classes)
    self.text_head = nn.Linear(text_cfg['hidden_size'], num_classes)
    self.joint_head = nn.Linear(d, num_classes)

  def forward(self, images, ids, mask):
    z_img = self.image_encoder(images.permute(0, 3, 1, 2))
    z_txt = self.text_encoder(ids, mask)
    z_joint = self.fusion(z_img, z_txt)
    return {'z_img': z_img, 'z_txt': z_txt, 'z_uni': torch.cat([z_img, z_txt], -1),
            'z_joint': z_joint, 'logits_img': self.image_head(z_img),
            'logits_txt': self.text_head(z_txt), 'logits_joint': self.joint_head(z_joint)}


HEADS = ('image_head', 'text_head', 'joint_head')


def _param_groups(model):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if name.split('.')[0] in HEADS:
      p.requires_grad_(False)  # the heads get no gradient and stay unchanged
      continue
    module = model.get_submodule(name.rsplit('.', 1)[0])
    if name.endswith('bias') or isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
      no_decay.append(p)
    else:
      decay.append(p)
  return [{'params': decay, 'weight_decay': 0.01}, {'params': no_decay, 'weight_decay': 0.0}]


def _distance(z, target, mask):
  """Per-sample Euclidean distance, averaged over the K draws and the real rows."""
  sq = ((z[None] - target) ** 2).sum(-1)
  pos = sq > 0  # sqrt with a zero (not nan) gradient at 0, as the JAX step's safe_norm
  d = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), 0.0).mean(0)
  return (d * mask).sum() / mask.sum().clamp(min=1.0)


class ForgetMIStep:
  """f_u (trained), f_o (frozen copy) and AdamW; `step(batch)` is one Forget-MI update.

  batch: numpy dict like the JAX benchmark's: 'forget', 'retain' ({image [B,H,W,1],
  input_ids, attention_mask, mask}), 'forget_noisy' (input_ids / attention_mask [K,B,L]) and,
  for the cached path, 'targets' (forget_uni / forget_joint [K,B,D], retain_uni /
  retain_joint [B,D]). `trim=True` cuts each set's text to its longest real sequence.
  """

  def __init__(self, model, lr=1e-4, weights=(0.25, 0.25, 0.25, 0.25), noise_sigma=0.1,
               seed=0):
    import copy
    self.model = model
    self.original = copy.deepcopy(model).eval()
    for p in self.original.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.AdamW(_param_groups(model), lr=lr, betas=(0.9, 0.999), eps=1e-6)
    self.w = weights  # UR, UU, MU, MR
    self.sigma = noise_sigma
    self.gen = torch.Generator().manual_seed(seed)

  @staticmethod
  def _tensors(x, trim):
    ids = torch.as_tensor(np.asarray(x['input_ids']), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(x['attention_mask']), dtype=torch.long)
    if trim:
      real = torch.nonzero(mask.reshape(-1, mask.shape[-1]).any(0))
      n = int(real.max()) + 1 if len(real) else 1
      ids, mask = ids[..., :n], mask[..., :n]
    return ids, mask

  def targets(self, batch, trim=False):
    """f_o's embeddings (eval mode, no grad) of the noisy forget copies and the retain set."""
    f, r = batch['forget'], batch['retain']
    ids_n, mask_n = self._tensors(batch['forget_noisy'], trim)
    img = torch.as_tensor(np.asarray(f['image']))
    with torch.no_grad():
      uni, joint = [], []
      for k in range(ids_n.shape[0]):
        noisy = torch.clamp(img + self.sigma * torch.randn(img.shape, generator=self.gen), 0, 1)
        out = self.original(noisy, ids_n[k], mask_n[k])
        uni.append(out['z_uni'])
        joint.append(out['z_joint'])
      ids_r, mask_r = self._tensors(r, trim)
      out = self.original(torch.as_tensor(np.asarray(r['image'])), ids_r, mask_r)
    return {'forget_uni': torch.stack(uni), 'forget_joint': torch.stack(joint),
            'retain_uni': out['z_uni'], 'retain_joint': out['z_joint']}

  def losses(self, batch, targets, trim=False, backward=True):
    """The four terms with f_u in train mode; backward one set at a time if asked."""
    w_ur, w_uu, w_mu, w_mr = self.w
    self.model.train()
    f, r = batch['forget'], batch['retain']
    ids_f, mask_f = self._tensors(f, trim)
    m_f = torch.as_tensor(np.asarray(f['mask']), dtype=torch.float32)
    out = self.model(torch.as_tensor(np.asarray(f['image'])), ids_f, mask_f)
    uu = -_distance(out['z_uni'], targets['forget_uni'], m_f)
    mu = -_distance(out['z_joint'], targets['forget_joint'], m_f)
    if backward:
      (w_uu * uu + w_mu * mu).backward()
    ids_r, mask_r = self._tensors(r, trim)
    m_r = torch.as_tensor(np.asarray(r['mask']), dtype=torch.float32)
    out = self.model(torch.as_tensor(np.asarray(r['image'])), ids_r, mask_r)
    ur = _distance(out['z_uni'], targets['retain_uni'][None], m_r)
    mr = _distance(out['z_joint'], targets['retain_joint'][None], m_r)
    if backward:
      (w_ur * ur + w_mr * mr).backward()
    terms = {'ur': ur.detach(), 'uu': uu.detach(), 'mu': mu.detach(), 'mr': mr.detach()}
    terms['loss'] = w_ur * terms['ur'] + w_uu * terms['uu'] + w_mu * terms['mu'] + \
        w_mr * terms['mr']
    return terms

  def step(self, batch, trim=False):
    """One update; uses batch['targets'] when given (cached path), else runs f_o live."""
    if 'targets' in batch:
      targets = {k: torch.as_tensor(np.asarray(v)) for k, v in batch['targets'].items()}
    else:
      targets = self.targets(batch, trim)
    self.opt.zero_grad(set_to_none=True)
    terms = self.losses(batch, targets, trim)
    self.opt.step()
    return {k: float(v) for k, v in terms.items()}


# ------------------------------------------------------------------ weights from the JAX model
def _flat(tree, prefix=()):
  if hasattr(tree, 'items'):
    out = []
    for k, v in tree.items():
      out.extend(_flat(v, prefix + (str(k),)))
    return out
  return [(prefix, np.asarray(tree))]


def load_flax_variables(model, variables):
  """Copy a flax {'params', 'batch_stats'} of forgetmi_jax's MultimodalModel into `model`
  (kernels transposed to torch layouts); every torch parameter must be covered."""
  state = {}
  for path, value in _flat(variables['params']):
    *mods, leaf = path
    module = model.get_submodule('.'.join(mods))
    if leaf == 'kernel' and isinstance(module, nn.Conv2d):
      state['.'.join(mods) + '.weight'] = value.transpose(3, 2, 0, 1)
    elif leaf == 'kernel':
      state['.'.join(mods) + '.weight'] = value.T
    elif leaf in ('scale', 'embedding'):
      state['.'.join(mods) + '.weight'] = value
    elif leaf == 'bias':
      state['.'.join(mods) + '.bias'] = value
    else:
      raise KeyError(f'unmapped flax parameter {"/".join(path)}')
  for path, value in _flat(variables.get('batch_stats', {})):
    *mods, leaf = path
    state['.'.join(mods) + {'mean': '.running_mean', 'var': '.running_var'}[leaf]] = value
  own = model.state_dict()
  missing = sorted(k for k in own if k not in state and not k.endswith('num_batches_tracked'))
  unknown = sorted(k for k in state if k not in own)
  if missing or unknown:
    raise KeyError(f'torch/flax mismatch: missing {missing[:5]}, unknown {unknown[:5]}')
  with torch.no_grad():
    for k, v in state.items():
      if tuple(own[k].shape) != v.shape:
        raise ValueError(f'{k}: torch {tuple(own[k].shape)} vs flax {v.shape}')
      own[k].copy_(torch.from_numpy(np.array(v, dtype=np.float32)))
