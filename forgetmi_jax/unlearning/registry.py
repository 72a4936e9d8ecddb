"""Unlearning methods by name: the config's `method` key picks one."""
import importlib

# name -> (module, class). Imported lazily so a method's dependencies load only when used.
_METHODS = {
    'forgetmi': ('forgetmi_jax.unlearning.forgetmi', 'ForgetMIMethod'),
    'neggrad_plus': ('forgetmi_jax.unlearning.neggrad_plus', 'NegGradPlusMethod'),
    'scrub': ('forgetmi_jax.unlearning.scrub', 'ScrubMethod'),
    'cf_k': ('forgetmi_jax.unlearning.cf_k', 'CFkMethod'),
    'eu_k': ('forgetmi_jax.unlearning.eu_k', 'EUkMethod'),
    'multidelete': ('forgetmi_jax.unlearning.multidelete', 'MultiDeleteMethod'),
}


def register(name: str, module: str, cls: str):
  _METHODS[name] = (module, cls)


def names():
  return sorted(_METHODS)


def get(name: str):
  if name not in _METHODS:
    raise ValueError(f'unknown unlearning method {name!r}; known: {", ".join(names())}')
  module, cls = _METHODS[name]
  return getattr(importlib.import_module(module), cls)
