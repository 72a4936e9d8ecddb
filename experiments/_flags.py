"""Shared absl flags: --config file.py[:arg] with --config.key=value overrides, --workdir."""
import logging
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so config files can `from configs import base`
  sys.path.insert(0, ROOT)

CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (file.py[:arg]).',
                                         lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (default runs/<config name>).')


def config_name():
  path = flags.FLAGS['config'].value_str if hasattr(flags.FLAGS['config'], 'value_str') else ''
  raw = sys.argv
  for i, a in enumerate(raw):
    if a.startswith('--config='):
      path = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(raw):
      path = raw[i + 1]
  name, _, arg = os.path.basename(path).partition(':')
  name = os.path.splitext(name)[0]
  return f'{name}_{arg}' if arg else name


def resolved_config():
  config = CONFIG.value
  with config.unlocked():
    if WORKDIR.value:
      config.workdir = WORKDIR.value
  return config


def parse_flags(argv):
  """absl's flag parsing, with a typo'd config key named in full (`forgetmi.lrr`, and what it
  may have meant) on one line instead of ml_collections' traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value: absl's one-line message, no traceback
    sys.stderr.write(f'FATAL Flags parsing error: {e}\nnothing was run.\n')
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    text = str(e)
    hint = re.search(r'Did you mean \W*"(\w+)\W* instead of \W*"(\w+)', text)
    quoted = re.findall(r"'(\w+)\\*'", text)
    key = hint.group(2) if hint else (quoted[0] if quoted else '')
    for arg in argv:
      name = arg.split('=', 1)[0]
      if name.startswith('--config.') and name.rsplit('.', 1)[-1] == key:
        path = name[len('--config.'):]
        fix = f' (did you mean {path.rsplit(".", 1)[0]}.{hint.group(1)}?)' if hint else ''
        sys.stderr.write(f'FATAL: unknown config key {path!r}{fix}; nothing was run.\n')
        sys.exit(2)
    raise


def setup_logging():
  """Our progress at INFO; libraries (orbax logs every checkpoint save) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('forgetmi_jax').setLevel(logging.INFO)
