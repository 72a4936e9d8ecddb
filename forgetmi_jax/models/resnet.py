"""Small 1-channel ResNet image encoder (Chauhan et al. 2020, REFERENCE 3).

torchvision-style BasicBlocks with no max-pool; the 'paper' preset reproduces the reference
network at 2048x2048 exactly (3,313,548 parameters with its 768->4 head). Smaller presets keep
the 768-d embedding for the low-resolution synthetic cohort.

Module names are part of the API: the stem is `stem_conv`/`stem_bn` and block j of stage i is
`stage{i}_block{j}`, so CF-k / EU-k can freeze or re-initialise "the last k blocks" by name
(`ResNetEncoder.block_names()` lists them in forward order).
"""
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Named configurations (kwargs of ResNetEncoder). All but 'fast64' give a 768-d map.
_PRESETS = {
    # Exact reference at 2048x2048: 512 after the stem, 7 stride-2 stages -> 4x4x192,
    # 2x2 average pool -> 2x2x192 -> 768.
    'paper': dict(stem_channels=8, stem_kernel=7, stem_stride=4,
                  stage_channels=(8, 16, 32, 64, 128, 192, 192), blocks_per_stage=2,
                  pool='fixed', pool_grid=2, embed_dim=None),
    # 128 px: 32 after the stem, 4 stages -> 2x2x192 -> 768.
    'small128': dict(stem_channels=8, stem_kernel=7, stem_stride=4,
                     stage_channels=(16, 32, 64, 192), blocks_per_stage=2,
                     pool='adaptive', pool_grid=2, embed_dim=None),
    # 64 px: 32 after a stride-2 stem, 4 stages -> 2x2x192 -> 768.
    'small64': dict(stem_channels=8, stem_kernel=7, stem_stride=2,
                    stage_channels=(16, 32, 64, 192), blocks_per_stage=2,
                    pool='adaptive', pool_grid=2, embed_dim=None),
    # 64 px, cheap on CPU (the synthetic default): a stride-4 stem to 16x16, 3 stages -> 2x2x128.
    'fast64': dict(stem_channels=16, stem_kernel=7, stem_stride=4,
                   stage_channels=(32, 64, 128), blocks_per_stage=2,
                   pool='adaptive', pool_grid=2, embed_dim=None),
    # 32 px (smoke runs): 16 after the stem, 3 stages -> 2x2x192 -> 768.
    'small32': dict(stem_channels=8, stem_kernel=7, stem_stride=2,
                    stage_channels=(16, 32, 192), blocks_per_stage=1,
                    pool='adaptive', pool_grid=2, embed_dim=None),
}


def resnet_preset(name: str) -> dict:
  """Keyword arguments of ResNetEncoder for a named configuration (a fresh copy)."""
  if name not in _PRESETS:
    raise ValueError(f'unknown ResNet preset {name!r} (known: {sorted(_PRESETS)})')
  return dict(_PRESETS[name])


def resnet_block_names(num_stages: int, blocks_per_stage: int) -> Tuple[str, ...]:
  """Residual block names in forward order (the last k are CF-k / EU-k's "last k blocks")."""
  return tuple(f'stage{i}_block{j}' for i in range(num_stages) for j in range(blocks_per_stage))


def _batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  # torch BatchNorm2d defaults: momentum 0.1 (flax's 0.9), eps 1e-5. Running stats live in
  # the 'batch_stats' collection so a frozen copy can run in eval mode without mutation.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  # Explicit symmetric padding k//2, as torch, so strided outputs align with the reference
  # (flax 'SAME' would pad asymmetrically for even inputs).
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                 dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(_batch_norm(train, self.dtype, 'bn1')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = _batch_norm(train, self.dtype, 'bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, self.dtype, 'downsample_conv')(x)
      x = _batch_norm(train, self.dtype, 'downsample_bn')(x)
    return nn.relu(y + x)


def adaptive_avg_pool(x, grid: int):
  """torch AdaptiveAvgPool2d on NHWC: bin i spans [floor(i*H/g), ceil((i+1)*H/g))."""
  _, h, w, _ = x.shape

  def bins(n):
    return [(math.floor(i * n / grid), math.ceil((i + 1) * n / grid)) for i in range(grid)]

  if h % grid == 0 and w % grid == 0:  # equal bins: one reshape-mean
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4))
  rows = []
  for h0, h1 in bins(h):
    rows.append(jnp.stack([x[:, h0:h1, w0:w1, :].mean(axis=(1, 2)) for w0, w1 in bins(w)],
                          axis=1))
  return jnp.stack(rows, axis=1)


class ResNetEncoder(nn.Module):
  """1-channel NHWC images [B, H, W, 1] -> embeddings [B, D].

  pool='fixed' is the reference head (2x2 average pool, stride 2, on the last map, then
  flatten); pool='adaptive' pools to pool_grid x pool_grid whatever the input size. Flatten is
  channel-major (C, H, W) like torch's NCHW `view`, so a ported head would line up.
  """
  stem_channels: int = 8
  stem_kernel: int = 7
  stem_stride: int = 4
  stage_channels: Sequence[int] = (8, 16, 32, 64, 128, 192, 192)
  blocks_per_stage: int = 2
  pool: str = 'fixed'
  pool_grid: int = 2
  embed_dim: Optional[int] = None
  dtype: Any = jnp.float32

  def block_names(self) -> Tuple[str, ...]:
    """Residual block names in forward order (usable on an unbound module)."""
    return resnet_block_names(len(self.stage_channels), self.blocks_per_stage)

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'ResNetEncoder expects [B, H, W, 1] images, got shape {x.shape}')
    x = x.astype(self.dtype)
    x = _conv(self.stem_channels, self.stem_kernel, self.stem_stride, self.dtype, 'stem_conv')(x)
    x = nn.relu(_batch_norm(train, self.dtype, 'stem_bn')(x))
    for i, ch in enumerate(self.stage_channels):
      for j in range(self.blocks_per_stage):
        x = BasicBlock(ch, stride=2 if j == 0 else 1, dtype=self.dtype,
                       name=f'stage{i}_block{j}')(x, train)
    if self.pool == 'fixed':
      if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"pool='fixed' needs a last map of at least 2x2, got {x.shape[1:3]}; "
                         "use pool='adaptive' or a larger image")
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    elif self.pool == 'adaptive':
      x = adaptive_avg_pool(x, self.pool_grid)
    else:
      raise ValueError(f"unknown pool {self.pool!r} (expected 'fixed' or 'adaptive')")
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    if self.embed_dim is not None and self.embed_dim != x.shape[-1]:
      x = nn.Dense(self.embed_dim, dtype=self.dtype, name='projection')(x)
    return x
