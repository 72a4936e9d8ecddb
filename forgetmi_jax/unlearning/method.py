"""What every unlearning method shares: the context it reads and its defaults for the loop.

A method is its pure step plus hooks (train/loop.Method); the loop is never rewritten per
method. Defaults here: start every copy from the frozen original, one optimiser for all copies
(each copy's learning rate injected into its optimiser state), Forget-MI-style epochs (the
forget set once, paired with an equal-size retain sample), step keys by (seed, epoch, step).
"""
import dataclasses
import math
from typing import Any, Callable

import jax

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.data.forget_sets import RetainSampler
from forgetmi_jax.data.pipeline import batches, unlearning_batches
from forgetmi_jax.train import optim
from forgetmi_jax.train.loop import Method
from forgetmi_jax.train.state import TrainState

# Optimiser keys every copy of one run must agree on (they share one compiled optimiser).
_SHARED_OPTIMISER_KEYS = ('optimizer', 'weight_decay', 'momentum', 'adam_eps')


@dataclasses.dataclass
class UnlearnContext:
  """Everything a method may read: the model, data, split and devices (no mutable state)."""
  model: Any
  source: Any  # data.pipeline.ExampleSource (cohort + tokens) or its device copy
  split: Any  # data.forget_sets.ForgetSplit
  noisy_tokens: Any = None  # forget-set noisy report tokens (Forget-MI)
  init_params: Callable | None = None  # key -> fresh params (EU-k)
  init_fusion: Callable | None = None  # key -> fresh fusion params, traceable (REFERENCE 8.1)
  text_buckets: Any = None  # each step's text cut to one of these lengths (data/trim.py)
  trunk: Any = None  # unlearning/trunk.Trunk: only the top trains; `source` carries its outputs

  @property
  def apply_fn(self):
    return self.model.apply


class UnlearningMethod(Method):
  """Base of Forget-MI and the baselines; subclasses override what differs."""
  frozen_modules = ()  # top-level submodules that must not change (e.g. the heads)

  def __init__(self, ctx: UnlearnContext, copies):
    super().__init__(copies)
    self.ctx = ctx
    self.cfg = self.copies[0].cfg  # what all copies share (checked below)
    for key in _SHARED_OPTIMISER_KEYS + ('epochs', 'batch_size'):
      values = {str(c.cfg.get(key)) for c in self.copies}
      if len(values) > 1:
        raise ValueError(f'{self.name}: copies disagree on {key} ({sorted(values)}); '
                         'they cannot share one program')
    self._tx = None
    self._samplers = {}

  # -- the optimiser and the start ------------------------------------------------------------
  def trainable(self, tree):
    """Bool mask of the leaves this method trains; None = all of them (with a frozen trunk,
    the leaves after it)."""
    return self.ctx.trunk.trainable(tree) if self.ctx.trunk is not None else None

  def frozen_mask(self, params):
    return optim.freeze_mask(params, self.frozen_modules, self.trainable)

  def tx(self, params):
    """One optimiser object for every copy (made once: an equal new one would recompile)."""
    if self._tx is None:
      self._tx = optim.from_config(self.cfg, self.frozen_mask(params))
    return self._tx

  def start_variables(self, original, copy):
    """The variables a copy starts from (EU-k re-initialises some)."""
    return original

  def accumulates(self):
    return False

  def init_state(self, original, copy):
    variables = self.start_variables(original, copy)
    state = TrainState.create(variables, self.tx(variables['params']),
                              accumulate=self.accumulates())
    return state.replace(opt_state=optim.set_learning_rate(state.opt_state, float(copy.cfg.lr)))

  # -- data and keys ----------------------------------------------------------------------
  def retain_sampler(self, seed):
    if seed not in self._samplers:
      split = self.ctx.split
      self._samplers[seed] = RetainSampler(self.ctx.source.cohort.subject_id, split.retain_idx,
                                           split.forget_subjects, seed=int(seed))
    return self._samplers[seed]

  def full_retain_pass(self):
    """`retain_pass='full'`: an epoch pairs the whole retain set (the reference algorithms'
    budget) instead of a forget-sized retain sample ('sample', Forget-MI's epochs)."""
    mode = self.cfg.get('retain_pass', 'sample')
    if mode not in ('sample', 'full'):
      raise ValueError(f"{self.name}.retain_pass={mode!r} is not one of ('sample', 'full')")
    return mode == 'full'

  def paired_batches(self, epoch, seed, retain_examples=None, forget_batch_size=None):
    """The forget set once, each batch paired with retain examples (a forget-sized sample, or
    `retain_examples` of them with the forget set cycled, `forget_batch_size` rows a step)."""
    return unlearning_batches(self.ctx.source, self.ctx.split.forget_idx,
                              self.retain_sampler(seed), epoch, int(self.cfg.batch_size),
                              noisy_tokens=self.ctx.noisy_tokens, seed=int(seed),
                              retain_examples=retain_examples, buckets=self.ctx.text_buckets,
                              forget_batch_size=forget_batch_size)

  def paired_examples(self, retain_examples=None, forget_batch_size=None):
    """Real rows of one `paired_batches` epoch: the forget set and as many retain examples,
    or with the forget set cycled full forget batches beside `retain_examples`."""
    forget = len(self.ctx.split.forget_idx)
    if retain_examples is not None and int(retain_examples) > forget:
      size = int(self.cfg.batch_size)
      return math.ceil(int(retain_examples) / size) * int(forget_batch_size or size) + int(
          retain_examples)
    return 2 * forget

  def seed_batches(self, epoch, seed):
    full = self.full_retain_pass()
    return self.paired_batches(epoch, seed,
                               len(self.ctx.split.retain_idx) if full else None)

  def prepare_batch(self, batch, epoch, seed):
    """Only Forget-MI reads the noisy forget copies: the others do not ship them."""
    return {k: v for k, v in batch.items() if k != 'forget_noisy'}

  def retain_batches(self, epoch, seed):
    """One pass over the whole retain set, shuffled by (seed, epoch); full batches only."""
    return batches(self.ctx.source, self.ctx.split.retain_idx, int(self.cfg.batch_size),
                   seed=int(seed) + 2, epoch=epoch, drop_remainder=True,
                   buckets=self.ctx.text_buckets)

  def step_rng(self, seed, epoch, index):
    return jax.random.fold_in(jax.random.fold_in(rng_lib.root(seed), rng_lib.UNLEARN_STEP + epoch),
                              index)

  # -- one gradient step for the baselines ------------------------------------------------
  def descend(self, loss_fn, state, original, batch, rng, hparams):
    """(state, metrics) after one step on loss_fn(params, batch_stats, original, batch, rng,
    hparams) -> (loss, (batch_stats, metrics)). Leaves outside `trainable` are constants (XLA
    skips their backward) and keep their BatchNorm statistics."""
    trainable = self.trainable(state.params)

    def loss(params):
      return loss_fn(stop_frozen(params, trainable), state.batch_stats, original, batch, rng,
                     hparams)
    grads, (stats, metrics) = jax.grad(loss, has_aux=True)(state.params)
    if trainable is not None:
      stats = keep_frozen_stats(state.batch_stats, stats, self.trainable(state.batch_stats))
    return state.apply_gradients(grads, batch_stats=stats), metrics


def stop_frozen(params, trainable):
  """Frozen leaves become constants, so XLA skips their part of the backward pass."""
  if trainable is None:
    return params
  return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                trainable)


def keep_frozen_stats(old, new, trainable):
  """BatchNorm running statistics of frozen blocks stay as they were (truly frozen)."""
  if trainable is None:
    return new
  return jax.tree_util.tree_map(lambda o, n, t: n if t else o, old, new, trainable)
