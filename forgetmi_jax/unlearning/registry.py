"""The one list of unlearning methods: the config's `method` key picks one, `config.<name>` is
its config group, and runners, validation and reports read names and labels from here."""
import dataclasses

from forgetmi_jax.unlearning.cf_k import CFkMethod
from forgetmi_jax.unlearning.eu_k import EUkMethod
from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod, ForgetMIPaperMethod
from forgetmi_jax.unlearning.multidelete import MultiDeleteMethod
from forgetmi_jax.unlearning.neggrad_plus import NegGradPlusMethod
from forgetmi_jax.unlearning.scrub import ScrubMethod


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  cls: type
  label: str  # as tables print it


# In the order tables list them (the paper's Table 1 puts Forget-MI last; ours first).
# 'forgetmi' is our variant beyond the paper; 'forgetmi_paper' is the paper's method as given.
_METHODS = {
    'forgetmi': MethodSpec(ForgetMIMethod, 'Forget-MI+ (beyond paper)'),
    'forgetmi_paper': MethodSpec(ForgetMIPaperMethod, 'Forget-MI (paper)'),
    'neggrad_plus': MethodSpec(NegGradPlusMethod, 'NegGrad+'),
    'scrub': MethodSpec(ScrubMethod, 'SCRUB'),
    'cf_k': MethodSpec(CFkMethod, 'CF-k'),
    'eu_k': MethodSpec(EUkMethod, 'EU-k'),
    'multidelete': MethodSpec(MultiDeleteMethod, 'MultiDelete'),
}
REFERENCE_LABELS = {'original': 'Original', 'retrain': 'Retrain'}


def register(name: str, cls: type, label: str | None = None):
  """Add a method (e.g. from a notebook): it then runs everywhere a built-in one does."""
  if name in _METHODS or name in REFERENCE_LABELS:
    raise ValueError(f'method {name!r} is already registered')
  _METHODS[name] = MethodSpec(cls, label or name)


def names():
  return tuple(_METHODS)


def get(name: str) -> type:
  if name not in _METHODS:
    raise ValueError(f'unknown unlearning method {name!r}; known: {", ".join(names())}')
  return _METHODS[name].cls


def label(name: str) -> str:
  """How tables print a model key (a method, 'original' or 'retrain')."""
  if name in _METHODS:
    return _METHODS[name].label
  return REFERENCE_LABELS.get(name, name)
