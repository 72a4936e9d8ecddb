"""What code needs to know about a config: presets, the `:arg` parser, validation, fingerprints.

Config files (configs/*.py, big_vision style) build an ml_collections.ConfigDict from these;
library code reads the ConfigDict and never imports the configs/ folder.
"""
import hashlib
import json
import math

import ml_collections

from forgetmi_jax.unlearning import registry

# Paper settings of the four Forget-MI loss weights (REFERENCE 4), before normalisation.
LOSS_WEIGHT_PRESETS = {
    'equal': dict(ur=1.0, uu=1.0, mu=1.0, mr=1.0),
    'multimodal': dict(ur=1.0, uu=1.0, mu=2.0, mr=2.0),
    'unimodal': dict(ur=2.0, uu=2.0, mu=1.0, mr=1.0),
    'retention': dict(ur=2.0, uu=1.0, mu=1.0, mr=2.0),
    'no_noise': dict(ur=1.0, uu=1.0, mu=1.0, mr=1.0),
}
# The paper's best Forget-MI setting per forget-set size (REFERENCE 6 and its text).
BEST_SETTING = {3: 'unimodal', 6: 'multimodal', 10: 'retention'}
PCTS = (3, 6, 10)

_CHOICES = {
    'data.source': ('synthetic', 'mimic_cxr'),
    'data.image_fit': ('crop_pad', 'resize'),
    'model.fusion.variant': ('per_sample', 'reference'),
    'forgetmi.noise.text_mode': ('char', 'word', 'reference', 'none'),
    'forgetmi_paper.noise.text_mode': ('char', 'word', 'reference', 'none'),
    'eval.head': ('image', 'joint'),
    'stop.rule': ('validation', 'none'),
    'stop.attack': ('svc', 'auc'),
    'forgetmi.forget_bound': ('none', 'validation'),
    'forgetmi_paper.forget_bound': ('none', 'validation'),
    'model.text_buckets': ('pow2', 'multiple', 'none'),
    'data.placement': ('auto', 'host', 'device'),
}
# Keys that say where things go, not what is computed: left out of every fingerprint.
_NOT_RESULT_KEYS = ('workdir', 'cache_dir', 'compile_cache_dir', 'data.data_dir',
                    'data.placement')


def parse_arg(arg, **spec):
  """'smoke,method=scrub,pct=3' -> ConfigDict, typed like `spec`'s defaults (big_vision's
  parse_arg): a bare name is a bool flag; unknown names are an error naming them."""
  out = ml_collections.ConfigDict(dict(spec))
  for part in (str(arg).split(',') if arg else ()):
    part = part.strip()
    if not part:
      continue
    name, has_value, value = part.partition('=')
    if name not in spec:
      raise ValueError(f'unknown config argument {name!r} in {arg!r} (known: {sorted(spec)})')
    default = spec[name]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {name!r} needs a value ({name}=...)')
      out[name] = True
    elif isinstance(default, bool):
      out[name] = value.lower() in ('1', 'true', 'yes')
    else:
      try:
        out[name] = type(default)(value)
      except ValueError:
        raise ValueError(f'config argument {name}={value!r} is not a {type(default).__name__}'
                         ) from None
  return out


def get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def method_config(config, name):
  """A method's config group: `config.<name>` for every method, Forget-MI included."""
  registry.get(name)
  return config[name]


FORGETMI_GROUPS = ('forgetmi', 'forgetmi_paper')  # Forget-MI beyond the paper, and as given


def resolve(config):
  """Fill derived defaults in place (loss weights from the setting), then validate."""
  for group in FORGETMI_GROUPS:
    weights = config[group].loss_weights
    if all(float(v) < 0 for v in weights.values()):
      preset = LOSS_WEIGHT_PRESETS.get(config[group].setting)
      if preset is not None:
        with config.unlocked():
          for k, v in preset.items():
            weights[k] = float(v)
  return validate(config)


def validate(config):
  """Raise ValueError naming every invalid key (unknown keys fail in the flag parser)."""
  errors = []
  for key, choices in _CHOICES.items():
    value = get(config, key)
    if value not in choices:
      errors.append(f'{key}={value!r} is not one of {choices}')
  if config.method not in registry.names():
    errors.append(f'method={config.method!r} is not one of {list(registry.names())}')
  for group in FORGETMI_GROUPS:
    if config[group].setting not in LOSS_WEIGHT_PRESETS:
      errors.append(f'{group}.setting={config[group].setting!r} is not one of '
                    f'{sorted(LOSS_WEIGHT_PRESETS)}')
  if not config.data.forget_csv and not 0 < config.forget_fraction < 0.5:
    errors.append(f'forget_fraction={config.forget_fraction} must be in (0, 0.5)')
  if int(config.num_seeds) < 1:
    errors.append(f'num_seeds={config.num_seeds} must be >= 1')
  if int(config.copies_per_program) < 0:
    errors.append(f'copies_per_program={config.copies_per_program} must be >= 0 (0 = automatic)')
  if not float(config.checkpoint_every_s) >= 0:
    errors.append(f'checkpoint_every_s={config.checkpoint_every_s} must be >= 0 (0 = every epoch)')
  positive = ['data.image_size', 'data.max_text_len', 'train.epochs', 'train.batch_size',
              'forgetmi.noise.num_draws', 'eval.batch_size']
  for name in registry.names():
    positive += [f'{name}.epochs', f'{name}.batch_size']
  for key in positive:
    if int(get(config, key)) <= 0:
      errors.append(f'{key}={get(config, key)} must be positive')
  for key in ['train.lr'] + [f'{name}.lr' for name in registry.names()]:
    if not float(get(config, key)) > 0:
      errors.append(f'{key}={get(config, key)} must be > 0')
  for group in FORGETMI_GROUPS:
    noise = config[group].noise
    if float(noise.image_sigma) < 0:
      errors.append(f'{group}.noise.image_sigma={noise.image_sigma} must be >= 0')
    if not 0 <= float(noise.text_p) <= 1:
      errors.append(f'{group}.noise.text_p={noise.text_p} must be in [0, 1]')
    weights = config[group].loss_weights
    if set(weights.keys()) != {'ur', 'uu', 'mu', 'mr'}:
      errors.append(f'{group}.loss_weights must have keys ur, uu, mu, mr; got {sorted(weights)}')
    elif any(float(v) < 0 for v in weights.values()) or sum(map(float, weights.values())) <= 0:
      errors.append(f'{group}.loss_weights={dict(weights)} must be >= 0 with a positive sum')
  for group in FORGETMI_GROUPS:
    strength = float(config[group].get('project_conflicts', 0.0))
    if not 0 <= strength <= 1:
      errors.append(f'{group}.project_conflicts={strength} must be in [0, 1] (0 = the paper)')
    budget = float(config[group].get('budget', 0.0))
    if not (math.isfinite(budget) and budget >= 0):
      errors.append(f'{group}.budget={budget} must be >= 0 (a fraction of retraining\'s cost; '
                    '0 = none)')
  repair = config.forgetmi.get('repair')
  if repair is not None and not 0 <= float(repair.get('budget_share', 0.5)) < 1:
    errors.append(f'forgetmi.repair.budget_share={repair.budget_share} must be in [0, 1)')
  trunk = config.forgetmi.get('trunk')
  if trunk is not None and (int(trunk.k_image) < 0) != (int(trunk.k_text) < 0):
    errors.append(f'forgetmi.trunk.k_image={trunk.k_image} and forgetmi.trunk.k_text='
                  f'{trunk.k_text}: both >= 0 (a frozen trunk) or both -1 (none)')
  if int(config.stop.patience) < 1:
    errors.append(f'stop.patience={config.stop.patience} must be >= 1')
  if not 0 <= float(config.data.val_fraction) < 0.5:
    errors.append(f'data.val_fraction={config.data.val_fraction} must be in [0, 0.5)')
  if config.stop.rule == 'validation' and float(config.data.val_fraction) == 0:
    errors.append('stop.rule=validation needs validation non-members: data.val_fraction > 0 '
                  '(or stop.rule=none)')
  if config.data.source == 'mimic_cxr' and not (config.data.split_csv and config.data.mimic_root):
    errors.append('data.source=mimic_cxr needs data.split_csv and data.mimic_root')
  if errors:
    raise ValueError('invalid config:\n  ' + '\n  '.join(errors))
  return config


def seeds(config):
  """The run's seeds: `seed, seed + 1, ...` (`num_seeds` of them; 0..N-1 by default). Seed i
  retrains model i and runs unlearning copy i; the cohort and the original come from `seed`."""
  return [int(config.seed) + i for i in range(int(config.num_seeds))]


# ------------------------------------------------------------------------------ fingerprints
def fingerprint(*parts) -> str:
  """Stable short hash of JSON-serialisable parts (configs as dicts, id lists as lists)."""
  blob = json.dumps(parts, sort_keys=True, default=_default).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _default(x):
  if hasattr(x, 'tolist'):
    return x.tolist()
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  raise TypeError(f'cannot fingerprint {type(x).__name__}')


def result_dict(config) -> dict:
  """The config as a dict without the keys that only say where outputs go."""
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  for dotted in _NOT_RESULT_KEYS:
    node, *rest = dotted.split('.')
    if not rest:
      d.pop(node, None)
    elif node in d and isinstance(d[node], dict):
      d[node] = {k: v for k, v in d[node].items() if k != rest[0]}
  return d


def differing_keys(a: dict, b: dict, prefix=''):
  """Dotted keys whose values differ between two nested dicts (for refusals that name them)."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if isinstance(va, dict) and isinstance(vb, dict):
      out += differing_keys(va, vb, f'{prefix}{k}.')
    elif json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True,
                                                                    default=str):
      out.append(f'{prefix}{k}')
  return out
