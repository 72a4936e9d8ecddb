"""What the run-level benchmarks share: the repo on sys.path and a config file's get_config."""
import importlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so config files can `from configs import base`
  sys.path.insert(0, ROOT)


def load_config(path, arg):
  """configs/<name>.py's get_config(arg)."""
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f'configs.{name}').get_config(arg)


def add_run_flags(parser, default_config):
  """--config (a file in configs/), --config_arg, --workdir: every run-level benchmark's."""
  parser.add_argument('--config', default=default_config)
  parser.add_argument('--config_arg', default='')
  parser.add_argument('--workdir', default='', help='default: a new temporary folder')


def run_config(args, prefix):
  """(root, config): the folder the benchmark writes in (--workdir, else a new temporary one)
  and the --config file's config, its workdir inside that folder."""
  root = args.workdir or tempfile.mkdtemp(prefix=prefix)
  config = load_config(os.path.join(ROOT, args.config), args.config_arg or None)
  with config.unlocked():
    config.workdir = os.path.join(root, 'run')
  return root, config
