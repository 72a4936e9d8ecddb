"""THE loop: N stacked copies of a model, trained or unlearned together.

Every model this project makes runs through `run`: the original and retrained models
(train/trainer.py), every unlearning method (unlearning/) and ablation grids. A method supplies
its pure step and its per-epoch hooks (the `Method` interface below); the loop supplies the
rest, written once: stacking, vmap over the copies, data-parallel sharding, per-epoch orbax
checkpoints with exact resume, memory-aware chunking, progress and event logging.

Copies: each has its own seed (data order, dropout, noise) and its own config (lr, loss
weights, ...), stacked on a leading axis. Copies that share a seed share their batches
(`in_axes=None`, one data pass for all); otherwise each copy gets its own batch (stacked).
N = 1 runs the method's own jitted step on the unstacked copy (no vmap): a plain run is bit
for bit the single-model computation.
"""
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from forgetmi_jax.data.trim import stack_batches
from forgetmi_jax.train import parallel
from forgetmi_jax.train import optim
from forgetmi_jax.train.checkpoints import Checkpoints, load_variables, save_variables
from forgetmi_jax.train.tensorboard import EventWriter

log = logging.getLogger('forgetmi_jax')
# What one scored image costs against an example budget, in trained examples: a forward
# only, where a training step's example costs its forward and a backward about twice as long.
SCORE_COST = 1.0 / 3.0
# Under an example budget an epoch starts only when this share of it (`Method.epoch_examples`)
# and its score still fit: a score after a few steps costs more than the steps move.
MIN_EPOCH_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Copy:
  """One model copy: its seed and its method config (a `config.<method>` group)."""
  seed: int
  cfg: Any
  name: str = ''


class Method:
  """The interface the loop runs; training and every unlearning method implement it."""
  name = 'method'

  def __init__(self, copies: Sequence[Copy]):
    if not copies:
      raise ValueError(f'{self.name}: no copies to run')
    self.copies = list(copies)

  # -- shape of the run -------------------------------------------------------------------
  @property
  def epochs(self) -> int:
    return int(self.copies[0].cfg.epochs)

  @property
  def seeds(self):
    return [int(c.seed) for c in self.copies]

  @property
  def shared_batch(self) -> bool:
    """All copies share one seed, hence one data order: one batch serves them all."""
    return len(set(self.seeds)) == 1

  def with_copies(self, copies):
    """The same method over other copies (a chunk): shares whatever was computed once."""
    clone = self.__class__.__new__(self.__class__)
    clone.__dict__.update(self.__dict__)
    clone.copies = list(copies)
    return clone

  # -- what a method supplies -------------------------------------------------------------
  def init_state(self, original, copy: Copy):
    """One copy's initial TrainState (all copies must share one `tx` object)."""
    raise NotImplementedError

  def hparams(self, copy: Copy) -> dict:
    """One copy's traced hyperparameters (arrays): stacked over copies by the loop."""
    return {}

  def seed_batches(self, epoch: int, seed: int):
    """The host batches of one epoch for copies with this seed."""
    raise NotImplementedError

  def step_rng(self, seed: int, epoch: int, index: int):
    raise NotImplementedError

  def epoch_examples(self, epoch: int) -> float | None:
    """Real rows one copy steps in `epoch` (what it costs against an example budget); None
    when not known ahead, and then an epoch starts whenever one step and its score fit."""
    return None

  def step(self, state, original, batch, rng, hparams):
    """Pure: one copy's (state, metrics) after one batch. `original` is the frozen original's
    `{'params', 'batch_stats'}`, an argument (never closed over)."""
    raise NotImplementedError

  # -- hooks (defaults do nothing) --------------------------------------------------------
  def prepare(self, original):
    """Once before the first epoch (e.g. cache the frozen original's outputs)."""

  def start_epoch(self, epoch: int, hparams: dict) -> dict:
    return hparams

  def prepare_batch(self, batch: dict, epoch: int, seed: int) -> dict:
    """Host-side additions to one seed's batch (e.g. cached targets)."""
    return batch

  def end_epoch(self, epoch: int, states, hparams: dict, last: dict):
    """After an epoch, on the stacked states; `last` = the epoch's last metrics [N] each."""
    return states, hparams


# ------------------------------------------------------------------------------ stacking
def stack(trees):
  """Copies' pytrees stacked leaf by leaf on the host, then put on the device in one call: a
  jnp.stack per leaf compiles one small program per leaf shape (about 1.4 s for the default
  model's 344 leaves, per process; `benchmarks/bench_loop.py`)."""
  return jax.device_put(jax.tree_util.tree_map(
      lambda *x: np.stack([np.asarray(v) for v in x]), *trees))


def unstack(tree, n: int):
  return [jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(n)]


def _squeeze(tree):
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def _expand(tree):
  return jax.tree_util.tree_map(lambda x: x[None], tree)


def _donate():
  """Donating the states lets XLA update them in place (not implemented on CPU)."""
  return (0,) if jax.default_backend() != 'cpu' else ()


def stacked_step(step: Callable, shared: bool):
  """The jitted step over stacked copies, vmapped: (states, original, batch, rngs, hparams),
  the batch shared by all copies or stacked per copy."""
  return jax.jit(jax.vmap(step, in_axes=(0, None, None if shared else 0, 0, 0)),
                 donate_argnums=_donate())


class _Program:
  """How the loop steps n copies. One copy stays unstacked between steps and runs the method's
  own jitted step, so a plain run is bit for bit the single-model computation (a squeeze
  inside the program changes XLA's rounding); the stacked form is made at epoch boundaries
  only, for the hooks and checkpoints. More copies are vmapped."""

  def __init__(self, step, n, shared):
    self.single = n == 1
    self.fn = (jax.jit(step, donate_argnums=_donate()) if self.single
               else stacked_step(step, shared))

  def enter(self, stacked):
    return _squeeze(stacked) if self.single else stacked

  def leave(self, carry):
    return _expand(carry) if self.single else carry

  def __call__(self, carry, original, batch, rngs, hparams):
    return self.fn(carry, original, batch, rngs[0] if self.single else rngs, hparams)


def shard_step_batch(batch, mesh, shared: bool):
  """Shard a step batch over the mesh's data axis: the example axis is the first after the
  copy axis (stacked batches) and the noise-draw axis ('forget_noisy': [K, B, L])."""
  if shared:
    return parallel.shard_batch(batch, mesh)
  return parallel.shard_batch(batch, mesh, leading_axes=1)


# ------------------------------------------------------------------------------ memory
def program_bytes(compiled):
  """Device bytes of a compiled program: arguments + outputs + temporaries - aliases."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)


def _abstract(tree, copies=None):
  def f(x):
    x = jnp.asarray(x) if not hasattr(x, 'shape') else x
    shape = tuple(x.shape) if copies is None else (copies,) + tuple(x.shape)
    return jax.ShapeDtypeStruct(shape, x.dtype)
  return jax.tree_util.tree_map(f, tree)


def estimate_memory(method: Method, original, batch, state, hparams):
  """{'per_copy_bytes', 'fixed_bytes'} from compiling the vmapped step for 1 and 2 copies
  (abstract inputs, nothing runs) and reading XLA's memory_analysis(). Linear in the copies
  (checked on the tiny model: 1, 2 and 4 copies give 15.8, 31.2 and 61.9 MB on CPU)."""
  # On CPU, LLVM codegen is most of the compile time and does not change XLA's buffer
  # assignment, so the measurement compiles without it (same numbers, about half the time).
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  measured = {}
  for c in (1, 2):
    fn = stacked_step(method.step, method.shared_batch)
    b = batch if method.shared_batch else _abstract(batch, c)
    args = (_abstract(state, c), _abstract(original), _abstract(b),
            _abstract(jax.random.PRNGKey(0), c), _abstract(hparams, c))
    measured[c] = program_bytes(fn.lower(*args).compile(compiler_options=options))
  if measured[1] is None or measured[2] is None:
    return None
  per_copy = max(measured[2] - measured[1], 1)
  return {'per_copy_bytes': int(per_copy), 'fixed_bytes': int(max(measured[1] - per_copy, 0)),
          'measured_bytes': {str(k): v for k, v in measured.items()}}


def plan_chunks(n, per_copy_bytes=None, fixed_bytes=0, budget_bytes=None, chunk_size=0):
  """Split n copies into equal-size chunks (sizes differ by at most 1; the loop pads the
  smaller ones so every chunk reuses one compiled program).

  chunk_size > 0 forces the size; otherwise as many copies as fit in `budget_bytes` given the
  measured per-copy and fixed bytes (at least 1, even when one copy exceeds the budget).
  """
  if n <= 0:
    return []
  if chunk_size and int(chunk_size) > 0:
    cap = int(chunk_size)
  elif per_copy_bytes and budget_bytes:
    cap = int((float(budget_bytes) - float(fixed_bytes)) // float(per_copy_bytes))
  else:
    cap = n
  cap = max(1, min(cap, n))
  chunks = math.ceil(n / cap)
  return [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]


# ------------------------------------------------------------------------------ stopping
@dataclasses.dataclass(frozen=True)
class Stopping:
  """Per-copy early stopping on a score where lower is better (evaluation/validation.py).

  Each copy is scored once before the first epoch (epoch -1, the start) and after every
  epoch. A copy whose best score has not improved by more than `min_delta` for `patience`
  epochs stops and ends with its best epoch's variables; a method that only hurts therefore
  returns its start. With `done_fn`, a copy also stops at once at a new best epoch whose
  scores meet it (e.g. the membership attack at chance). The run ends once every copy has
  stopped (a stopped copy stacked with running ones keeps stepping, but its result stays its
  best epoch's).
  """
  score_fn: Callable  # variables -> {key: float, ...}
  patience: int = 2
  min_delta: float = 0.0
  key: str = 'val_gap'
  # scores -> True when the goal is reached: a copy whose new best epoch meets it stops there
  done_fn: Callable | None = None
  score_rows: int = 0  # images one score forwards (what it costs against an example budget)


class _StopTrack:
  """Per-copy best score, best epoch, epochs since the best, and the best variables (host)."""

  def __init__(self, stopping: Stopping, n: int, saved=None):
    self.stopping, self.n = stopping, n
    saved = saved or {}
    self.best_score = list(saved.get('best_score', [math.inf] * n))
    self.best_epoch = list(saved.get('best_epoch', [None] * n))
    self.since = list(saved.get('since', [0] * n))
    self.scores = saved.get('scores', [[] for _ in range(n)])
    self.best_dir = saved.get('best_dir')  # a folder name inside the run's checkpoint folder
    self.best = None

  @property
  def all_stopped(self):
    return all(s >= self.stopping.patience for s in self.since)

  def observe(self, epoch, variables_per_copy, given=None):
    """Score every copy after `epoch` (or take `given`, one score row per copy, for variables
    already scored elsewhere); True when some copy has a new best."""
    improved = False
    if self.best is None:  # a start that cannot be scored (nan) is still a result
      self.best = list(variables_per_copy)
    for j, v in enumerate(variables_per_copy):
      if self.since[j] >= self.stopping.patience:
        continue  # stopped: its result is fixed
      row = {k: float(x) for k, x in (given[j] if given is not None
                                      else self.stopping.score_fn(v)).items() if k != 'epoch'}
      self.scores[j].append({'epoch': int(epoch), **row})
      score = row[self.stopping.key]
      if math.isfinite(score) and score < self.best_score[j] - float(self.stopping.min_delta):
        self.best_score[j], self.best_epoch[j], self.since[j] = score, int(epoch), 0
        self.best[j] = v
        improved = True
        if self.stopping.done_fn is not None and self.stopping.done_fn(row):
          self.since[j] = self.stopping.patience  # the goal is reached: stop here
      else:
        self.since[j] += 1
    return improved

  def save_best(self, directory, epoch):
    """The best variables of every copy (stacked), in a folder named by the epoch; returns
    the folder it replaces (to delete once the epoch's checkpoint names the new one)."""
    name = f'best-after-{epoch}'
    save_variables(os.path.join(directory, name), stack(self.best))
    old, self.best_dir = self.best_dir, name
    return os.path.join(directory, old) if old else None

  def restore_best(self, directory, like_per_copy):
    if self.best_dir and self.best is None:
      self.best = restore_best_variables(directory, self.best_dir, like_per_copy)

  def to_json(self):
    return {'best_score': self.best_score, 'best_epoch': self.best_epoch, 'since': self.since,
            'scores': self.scores, 'best_dir': self.best_dir}

  def summary(self):
    patience = self.stopping.patience
    return [{'best_epoch': self.best_epoch[j], 'best_score': self.best_score[j],
             'epochs_scored': len(self.scores[j]), 'stopped': self.since[j] >= patience,
             'scores': self.scores[j]} for j in range(self.n)]


def restore_best_variables(ckpt_dir, best_dir, like_per_copy):
  """The per-copy best variables a stopped run saved under `ckpt_dir`."""
  stacked = load_variables(os.path.join(ckpt_dir, best_dir), stack(like_per_copy))
  return unstack(stacked, len(like_per_copy))


def final_states(states, extra, ckpt_dir):
  """A finished run's result from its last checkpoint (`states` per copy, `extra` its JSON):
  with early stopping each copy's best variables, otherwise the last states."""
  best_dir = (extra.get('stopping') or {}).get('best_dir')
  if not best_dir:
    return states
  like = [s.variables for s in states]
  best = restore_best_variables(ckpt_dir, best_dir, like)
  return [s.replace(params=b['params'], batch_stats=b['batch_stats'])
          for s, b in zip(states, best)]


def _variables(states, n):
  return unstack(jax.device_get({'params': states.params, 'batch_stats': states.batch_stats}), n)


# ------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Result:
  """What a run returns: host states per copy, seconds, per-copy per-epoch histories, and
  per copy the early-stopping record (None without `stopping`)."""
  states: list
  seconds: float
  histories: list
  memory: dict | None = None
  fingerprint: str = ''
  resumed_from: list = dataclasses.field(default_factory=list)  # first epoch run, per chunk
  stopping: list | None = None
  spent: float = 0.0  # per copy, in trained examples: rows stepped + SCORE_COST x rows scored


def _epoch_batches(method: Method, epoch: int):
  """One epoch's step batches for all copies: shared, or stacked per copy."""
  seeds = list(dict.fromkeys(method.seeds))
  def stream(seed):
    for batch in method.seed_batches(epoch, seed):
      yield method.prepare_batch(batch, epoch, seed)
  streams = {s: stream(s) for s in seeds}
  if len(seeds) == 1:
    yield from streams[seeds[0]]
    return
  for per_seed in zip(*(streams[s] for s in seeds)):
    by_seed = dict(zip(seeds, per_seed))
    # Each seed's text may be cut to another length bucket: stacked at the longest.
    yield stack_batches([by_seed[s] for s in method.seeds])


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _jsonable(hparams):
  """The numeric hyperparameters as {'a/b': nested lists} (a checkpoint's JSON part)."""
  out = {}
  for k, v in _flat(hparams).items():
    a = np.asarray(jax.device_get(v))
    if a.dtype.kind in 'fiub':
      out[k] = a.tolist()
  return out


def _restore_hparams(hparams, saved):
  """Hook-changed hyperparameters (e.g. the retention cap) as the checkpoint holds them."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(hparams)
  restored = []
  for path, leaf in leaves:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    restored.append(jnp.asarray(np.asarray(saved[name]), dtype=jnp.asarray(leaf).dtype)
                    if name in saved else leaf)
  return jax.tree_util.tree_unflatten(treedef, restored)


def run(method: Method, original, ckpt_dir: str, *, desc: str = 'run', mesh=None,
        chunk_size: int = 0, memory_budget_bytes: float | None = None,
        tb_dir: str | None = None, stopping: Stopping | None = None,
        time_budget_s: float | None = None, example_budget: float | None = None,
        start_scores: list | None = None, checkpoint_every_s: float = 0.0) -> Result:
  """Run `method`'s copies from `original` ({'params', 'batch_stats'}) for its epochs.

  Per-epoch checkpoints under `ckpt_dir` (one folder per chunk); a killed run resumes from the
  last one and ends with the parameters of an uninterrupted run. With `checkpoint_every_s` > 0
  an epoch is checkpointed only when that many seconds have passed since the last checkpoint,
  and always when the run ends after it (its result is read from it): a kill then replays at
  most that much, and a run of short epochs does not spend its time writing them. Copies that
  do not fit `memory_budget_bytes` together (XLA's measured per-copy bytes) or `chunk_size`
  run in equal chunks. With `tb_dir`, TensorBoard event files get every step's metrics and
  each epoch's learning rate and examples/s (tags `<method>/<metric>`, per copy
  `<method>/<copy>/<metric>`). With `stopping`, each copy ends at its best-scoring epoch (see
  `Stopping`). With `time_budget_s` (seconds per copy: a chunk of k copies gets k times it),
  the run ends at the first step past the budget, finishing that epoch's hooks, scoring and
  checkpoint (an equal-wall-time comparison). With `example_budget` (per copy, in trained
  examples: each example a copy steps counts 1, each image a score forwards SCORE_COST, the
  start's score too), no step is taken that would leave too little for the epoch's score:
  the run ends within its budget, machine-independent and deterministic (`Result.spent` says
  how much), and an epoch whose `MIN_EPOCH_SHARE` (by `Method.epoch_examples`) cannot run is
  not begun.
  `start_scores` (one score row per copy) are the start's scores when the caller already has
  them (a second phase starting from the first's selected models): not scored, not charged.
  """
  mesh = mesh or parallel.make_mesh()
  n = len(method.copies)
  t0 = time.time()
  original = parallel.replicate(original, mesh)
  memory = None
  if n > 1 and not chunk_size and memory_budget_bytes:
    memory = _measure(method, original)
  sizes = plan_chunks(n, (memory or {}).get('per_copy_bytes'), (memory or {}).get('fixed_bytes', 0),
                      memory_budget_bytes, chunk_size)
  states, histories, start, resumed, programs, stops, spent = [], [], 0, [], {}, [], 0.0
  for c, size in enumerate(sizes):
    chunk = method.copies[start:start + size]
    pad = max(sizes) - size
    sub = method if len(sizes) == 1 else method.with_copies(chunk + [chunk[-1]] * pad)
    # The folder names the layout: a rerun chunked otherwise never restores these copies.
    name = f'chunk{c}-of-{len(sizes)}'
    sub_dir = ckpt_dir if len(sizes) == 1 else os.path.join(ckpt_dir, name)
    label = desc if len(sizes) == 1 else f'{desc} [{c + 1}/{len(sizes)}]'
    sub_tb = tb_dir if len(sizes) == 1 or not tb_dir else os.path.join(tb_dir, name)
    key = (len(sub.copies), sub.shared_batch)  # chunks of one shape share one compiled step
    if key not in programs:
      programs[key] = _Program(method.step, *key)
    budget = None if time_budget_s is None else float(time_budget_s) * len(sub.copies)
    given = None if start_scores is None else list(start_scores[start:start + size])
    given = given if given is None else given + given[-1:] * pad
    s, h, first, track, cost = _run_chunk(sub, original, sub_dir, label, mesh, sub_tb,
                                          programs[key], stopping, budget, example_budget, given,
                                          checkpoint_every_s)
    spent = max(spent, cost)
    resumed.append(first)
    states += s[:size]
    histories += h[:size]
    stops += track.summary()[:size] if track is not None else []
    start += size
  return Result(states, time.time() - t0, histories, memory, resumed_from=resumed,
                stopping=stops if stopping is not None else None, spent=spent)


def _measure(method, original):
  # Measured on the first step's batch: with text cut to length buckets (data/trim.py) a later
  # step cut to a longer bucket needs somewhat more activation memory than measured.
  method.prepare(original)
  batch = next(iter(_epoch_batches(method, 0)))
  if not method.shared_batch:  # per-copy batches come stacked [N, ...]: one copy's
    batch = _squeeze(batch)
  copy = method.copies[0]
  return estimate_memory(method, original, batch, method.init_state(original, copy),
                         method.hparams(copy))


def _tags(method, n):
  if n == 1:
    return [method.name]
  return [f'{method.name}/{c.name or f"copy{j}"}' for j, c in enumerate(method.copies)]


def _write_events(writer, tags, first_step, metrics_per_step, epoch_scalars):
  for i, metrics in enumerate(jax.device_get(metrics_per_step)):
    for j, tag in enumerate(tags):
      writer.scalars(first_step + i, {tag: {k: float(np.reshape(v, -1)[j])
                                            for k, v in metrics.items()}})
  last = first_step + len(metrics_per_step) - 1
  for j, tag in enumerate(tags):
    writer.scalars(last, {tag: {k: v[j] for k, v in epoch_scalars.items()}})
  writer.flush()


def _save(ckpt, states, epoch, extra, superseded):
  """Checkpoint `epoch`, then delete the best-model folders it no longer names."""
  ckpt.save(epoch, states, extra=extra)
  for folder in superseded:
    shutil.rmtree(folder, ignore_errors=True)
  superseded.clear()


def _run_chunk(method: Method, original, ckpt_dir, desc, mesh, tb_dir, program, stopping=None,
               budget_s=None, example_budget=None, start_scores=None, checkpoint_every_s=0.0):
  n = len(method.copies)
  score_cost = SCORE_COST * stopping.score_rows if stopping is not None else 0.0
  spent = 0.0  # per copy, in trained examples
  t_start = time.time()
  states = stack([method.init_state(original, c) for c in method.copies])
  hparams = stack([method.hparams(c) for c in method.copies])
  ckpt = Checkpoints(ckpt_dir)
  start, histories, track, ended = 0, [[] for _ in range(n)], None, False
  # when the last checkpoint was written; best models it no longer needs; an epoch not written
  saved_at, superseded, unsaved = time.time(), [], None
  if ckpt.latest_epoch() is not None:
    states, extra = ckpt.restore(states)
    start = ckpt.latest_epoch() + 1
    histories = extra.get('histories', histories)
    hparams = _restore_hparams(hparams, extra.get('hparams', {}))
    spent = float(extra.get('spent', 0.0))
    ended = bool(extra.get('out_of_budget', False))  # a rerun never trains past a budget
    if stopping is not None:
      track = _StopTrack(stopping, n, extra.get('stopping'))
      track.restore_best(ckpt_dir, _variables(states, n))
    log.info('%s: resuming after epoch %d from %s', desc, start - 1, ckpt_dir)
  elif stopping is not None:  # score the start: epoch -1
    track = _StopTrack(stopping, n)
    track.observe(-1, _variables(states, n), given=start_scores)
    spent += score_cost if start_scores is None else 0.0
    track.save_best(ckpt_dir, -1)
  states = parallel.replicate(states, mesh)
  shared = method.shared_batch
  if start < method.epochs:
    method.prepare(original)
  global_step = sum(e['steps'] for e in histories[0])
  writer = EventWriter(tb_dir, purge_step=global_step if start else None) if tb_dir else None
  tags = _tags(method, n)
  with tqdm(total=method.epochs, initial=start, desc=desc, unit='epoch',
            dynamic_ncols=True) as bar:
    out_of_time = ended
    for epoch in range(start, method.epochs):
      if out_of_time or (track is not None and track.all_stopped):
        break
      if example_budget is not None and spent + score_cost >= float(example_budget):
        break  # not even one step and its score fit
      expected = method.epoch_examples(epoch) if example_budget is not None else None
      if expected and spent + score_cost + MIN_EPOCH_SHARE * expected > float(example_budget):
        break  # too little of the epoch would run for its score to be worth it
      hparams = method.start_epoch(epoch, hparams)
      metrics, steps, seen, t_epoch, logged = None, 0, 0, time.time(), []
      carry, carry_hparams = program.enter(states), program.enter(hparams)
      for i, batch in enumerate(_epoch_batches(method, epoch)):
        rows = _real_rows(batch)
        per_copy = rows if shared else rows / n
        if example_budget is not None and spent + per_copy + score_cost > float(example_budget):
          out_of_time = True  # out of examples: this epoch ends here, with its score
          break
        rngs = jnp.stack([method.step_rng(s, epoch, i) for s in method.seeds])
        carry, metrics = program(carry, original, shard_step_batch(batch, mesh, shared), rngs,
                                 carry_hparams)
        steps += 1
        seen += rows
        spent += per_copy
        if writer is not None:
          logged.append(metrics)
        if budget_s is not None and time.time() - t_start > budget_s:
          out_of_time = True
          break
      if out_of_time and steps == 0:
        break  # the budget ended the run before this epoch's first step: nothing to score
      states = program.leave(carry)
      last = ({k: np.asarray(v).reshape(n) for k, v in jax.device_get(metrics).items()}
              if metrics is not None else {})
      states, hparams = method.end_epoch(epoch, states, hparams, last)
      rate = seen / max(time.time() - t_epoch, 1e-9)
      if writer is not None and logged:
        lrs = np.asarray(optim.learning_rates(jax.device_get(states.opt_state)))
        _write_events(writer, tags, global_step, logged,
                      {'lr': lrs.reshape(n, -1)[:, 0] if lrs.size else np.full(n, np.nan),
                       'examples_per_s': np.full(n, rate)})
      global_step += steps
      for j in range(n):
        histories[j].append({'epoch': epoch, 'steps': steps, 'examples_per_s': rate,
                             **{k: float(v[j]) for k, v in last.items()}})
      old_best = None
      if track is not None:
        spent += score_cost
        if track.observe(epoch, _variables(states, n)):
          old_best = track.save_best(ckpt_dir, epoch)
        for j, row in enumerate(track.scores):
          if row and row[-1]['epoch'] == epoch:
            histories[j][-1][stopping.key] = row[-1][stopping.key]
      for j in range(n):
        histories[j][-1]['spent'] = spent  # per copy so far, this epoch's score included
      extra = {'histories': histories, 'hparams': _jsonable(hparams), 'spent': spent,
               'out_of_budget': out_of_time,
               **({'stopping': track.to_json()} if track is not None else {})}
      if old_best:
        superseded.append(old_best)
      unsaved = (epoch, extra)
      if time.time() - saved_at >= float(checkpoint_every_s):
        _save(ckpt, states, *unsaved, superseded)
        saved_at, unsaved = time.time(), None
      postfix = {k: f'{float(np.mean(v)):.3f}' for k, v in list(last.items())[:6]}
      if track is not None:  # the copies still running: their best score so far
        running = [b for b, s in zip(track.best_score, track.since) if s < stopping.patience]
        postfix[f'best {stopping.key}'] = f'{min(track.best_score):.3f}'
        postfix['running'] = f'{len(running)}/{n}'
      bar.set_postfix(postfix | {'ex/s': f'{rate:.0f}'})
      bar.update(1)
  if unsaved is not None:  # however the run ended, its last epoch is on disk (its result)
    _save(ckpt, states, *unsaved, superseded)
  ckpt.close()
  if writer is not None:
    writer.close()
  host = unstack(jax.device_get(states), n)
  if track is not None:  # every copy ends at its best epoch
    host = [s.replace(params=b['params'], batch_stats=b['batch_stats'])
            for s, b in zip(host, track.best)]
  return host, histories, start, track, spent


def _real_rows(batch):
  """Real (unpadded) examples in a step batch, over its sets."""
  masks = [v['mask'] for v in batch.values() if isinstance(v, dict) and 'mask' in v]
  if 'mask' in batch:
    masks.append(batch['mask'])
  return int(sum(np.sum(np.asarray(m)) for m in masks))
