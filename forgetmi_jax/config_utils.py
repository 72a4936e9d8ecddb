"""Checks on a resolved config, run before any data is built or model trained."""
from forgetmi_jax.unlearning import registry

_CHOICES = {
    'data.source': ('synthetic', 'mimic_cxr'),
    'model.fusion.variant': ('per_sample', 'reference'),
    'unlearn.noise.text_mode': ('char', 'word', 'reference', 'none'),
    'eval.head': ('image', 'joint'),
}


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def resolve(config):
  """Fill derived defaults in place (loss weights from the setting), then validate."""
  from configs.base import LOSS_WEIGHT_PRESETS
  weights = config.unlearn.loss_weights
  if all(float(v) < 0 for v in weights.values()):
    preset = LOSS_WEIGHT_PRESETS.get(config.unlearn.setting)
    if preset is not None:
      with config.unlocked() if hasattr(config, 'unlocked') else _nullcontext():
        for k, v in preset.items():
          weights[k] = float(v)
  return validate(config)


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def validate(config):
  """Raise ValueError naming the key for an invalid value (unknown keys fail in the flag parser)."""
  from configs.base import LOSS_WEIGHT_PRESETS  # noqa: configs is a top-level folder
  errors = []
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      errors.append(f'{key}={value!r} is not one of {choices}')
  if config.method not in registry.names():
    errors.append(f'method={config.method!r} is not one of {registry.names()}')
  if config.unlearn.setting not in LOSS_WEIGHT_PRESETS:
    errors.append(f'unlearn.setting={config.unlearn.setting!r} is not one of '
                  f'{sorted(LOSS_WEIGHT_PRESETS)}')
  if not config.data.forget_csv and not 0 < config.forget_fraction < 0.5:
    errors.append(f'forget_fraction={config.forget_fraction} must be in (0, 0.5)')
  for key in ('data.image_size', 'data.max_text_len', 'train.epochs', 'train.batch_size',
              'unlearn.epochs', 'unlearn.batch_size', 'unlearn.noise.num_draws',
              'eval.batch_size'):
    if int(_get(config, key)) <= 0:
      errors.append(f'{key}={_get(config, key)} must be positive')
  for key in ('train.lr', 'unlearn.lr'):
    if not float(_get(config, key)) > 0:
      errors.append(f'{key}={_get(config, key)} must be > 0')
  if float(config.unlearn.noise.image_sigma) < 0:
    errors.append(f'unlearn.noise.image_sigma={config.unlearn.noise.image_sigma} must be >= 0')
  if not 0 <= float(config.unlearn.noise.text_p) <= 1:
    errors.append(f'unlearn.noise.text_p={config.unlearn.noise.text_p} must be in [0, 1]')
  weights = config.unlearn.loss_weights
  if set(weights.keys()) != {'ur', 'uu', 'mu', 'mr'}:
    errors.append(f'unlearn.loss_weights must have keys ur, uu, mu, mr; got {sorted(weights)}')
  elif any(float(v) < 0 for v in weights.values()) or sum(map(float, weights.values())) <= 0:
    errors.append(f'unlearn.loss_weights={dict(weights)} must be >= 0 with a positive sum')
  if config.data.source == 'mimic_cxr' and not (config.data.split_csv and config.data.mimic_root):
    errors.append('data.source=mimic_cxr needs data.split_csv and data.mimic_root')
  if errors:
    raise ValueError('invalid config:\n  ' + '\n  '.join(errors))
  return config
