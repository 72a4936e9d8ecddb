"""What the run-level benchmarks share: the repo on sys.path and a config file's get_config."""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # so config files can `from configs import base`
  sys.path.insert(0, ROOT)


def load_config(path, arg):
  """configs/<name>.py's get_config(arg)."""
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f'configs.{name}').get_config(arg)
