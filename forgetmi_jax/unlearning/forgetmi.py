"""Forget-MI (Hardan et al., MICCAI 2025): the four embedding losses and the pure step.

  UU = - d( f_u.uni(I_f, T_f),   f_o.uni(I~_f, T~_f) )     unimodal unlearning
  MU = - d( f_u.joint(I_f, T_f), f_o.joint(I~_f, T~_f) )   multimodal unlearning
  UR =   d( f_u.uni(I_r, T_r),   f_o.uni(I_r, T_r) )       unimodal retention
  MR =   d( f_u.joint(I_r, T_r), f_o.joint(I_r, T_r) )     multimodal retention
  loss = w_ur*UR + w_uu*UU + w_mu*MU + w_mr*MR,  weights normalised to sum 1

d = per-sample Euclidean distance (not squared), averaged over the K noise draws and the real
rows of the batch. The frozen original f_o is an argument, never closed over; the weights, noise
and retention caps are traced hyperparameters, so copies with other settings share one program.
"""
import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax import rng as rng_lib
from forgetmi_jax.data.noise import add_image_noise
from forgetmi_jax.data.pipeline import target_batches
from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.train.losses import distance, masked_mean
from forgetmi_jax.train.optim import HEAD_NAMES
from forgetmi_jax.unlearning.method import UnlearningMethod, keep_frozen_stats

TERMS = ('ur', 'uu', 'mu', 'mr')
NO_CAP = 1e30  # a retention cap that never binds (REFERENCE 8.3 is opt-in)
_TARGET_NAMES = ('forget_uni', 'forget_joint')


def normalised_weights(loss_weights, round_to_2=False):
  """{'ur', 'uu', 'mu', 'mr'} weights normalised to sum 1 (optionally rounded like the code)."""
  w = np.array([float(loss_weights[k]) for k in TERMS], np.float32)
  if np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f'loss weights must be >= 0 with a positive sum, got {dict(loss_weights)}')
  w = w / w.sum()
  if round_to_2:
    w = np.round(w, 2)
  return dict(zip(TERMS, w.tolist()))


# ------------------------------------------------------------------------------ the losses
def forget_terms(params, batch_stats, forget, targets, rng, apply_fn, bound=None, train=True):
  """UU and MU on the forget batch: the distances to f_o's noisy-copy embeddings, negated.

  `bound` {'uu', 'mu'} (beyond the paper): each sample's distance counts up to its bound,
  -mean(min(d, bound)), so a sample pushed as far as a non-member sits gets no more push
  and the loss cannot run away. None (the paper) = unbounded.
  """
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(forget), train=train,
                       rng=jax.random.fold_in(rng, rng_lib.FORGET_DROPOUT))
  d_uni = distance(out.z_uni, targets['forget_uni'])
  d_joint = distance(out.z_joint, targets['forget_joint'])
  if bound is not None:
    d_uni, d_joint = jnp.minimum(d_uni, bound['uu']), jnp.minimum(d_joint, bound['mu'])
  uu = -masked_mean(d_uni, forget['mask'])
  mu = -masked_mean(d_joint, forget['mask'])
  return {'uu': uu, 'mu': mu}, stats


def retain_terms(params, batch_stats, retain, targets, rng, apply_fn, bound=None, train=True):
  """UR and MR on the retain batch: the distances to f_o's embeddings of the same pairs."""
  del bound  # only the forget terms are bounded
  out, stats = forward(apply_fn, params, batch_stats, model_inputs(retain), train=train,
                       rng=jax.random.fold_in(rng, rng_lib.RETAIN_DROPOUT))
  ur = masked_mean(distance(out.z_uni, targets['retain_uni'][None]), retain['mask'])
  mr = masked_mean(distance(out.z_joint, targets['retain_joint'][None]), retain['mask'])
  return {'ur': ur, 'mr': mr}, stats


def weighted(terms, hp):
  """sum_k w_k * term_k; a retention term above its cap (REFERENCE 8.3) gives no gradient."""
  total = 0.0
  for name, value in terms.items():
    if name in hp['retention_cap']:
      cap = hp['retention_cap'][name]
      value = jnp.where(value > cap, jax.lax.stop_gradient(value), value)
    total = total + hp['loss_weights'][name] * value
  return total


def forgetmi_loss(params, batch_stats, targets, batch, rng, hp, apply_fn, train=True):
  """(total, (batch_stats, {'loss', 'ur', 'uu', 'mu', 'mr'})); forget set first, then retain,
  BatchNorm statistics threaded through as in the public code. `train`: the unlearned model's
  mode (the paper: train, i.e. dropout and batch statistics)."""
  bound = hp.get('forget_bound')
  f_terms, batch_stats = forget_terms(params, batch_stats, batch['forget'], targets, rng,
                                      apply_fn, bound, train)
  r_terms, batch_stats = retain_terms(params, batch_stats, batch['retain'], targets, rng,
                                      apply_fn, bound, train)
  terms = {**f_terms, **r_terms}
  loss = weighted(terms, hp)
  return loss, (batch_stats, {'loss': loss, **terms})


def forgetmi_grads(params, batch_stats, targets, batch, rng, hp, apply_fn, set_params=None,
                   train=True):
  """Gradient of forgetmi_loss -> (grads, (batch_stats, metrics)), one set at a time.

  The loss is a forget part plus a retain part sharing only the params (and BatchNorm
  statistics, threaded forget -> retain), so its gradient is the sum of theirs. The retain
  part reads the params through a zero that depends on the forget part's gradient, so XLA
  cannot start the retain forward before the forget backward has freed its activations:
  peak memory is one set's, not both (XLA:CPU drops optimization barriers and, without
  this, keeps both sets' activations: 24.4 instead of 18.1 GB at paper size, batch 16).
  `set_params(params, set_name)` swaps in per-set parameters (REFERENCE 8.1's gates).
  """
  def part(terms_fn, set_name):
    def loss(p, stats):
      if set_params is not None:
        p = set_params(p, set_name)
      terms, stats = terms_fn(p, stats, batch[set_name], targets, rng, apply_fn,
                              hp.get('forget_bound'), train)
      return weighted(terms, hp), (stats, terms)
    return loss

  grad_fn = lambda f: jax.value_and_grad(f, has_aux=True)  # noqa: E731
  (loss_f, (batch_stats, f_terms)), grads_f = grad_fn(part(forget_terms, 'forget'))(
      params, batch_stats)
  (loss_r, (batch_stats, r_terms)), grads_r = grad_fn(part(retain_terms, 'retain'))(
      _after(params, grads_f), batch_stats)
  metrics = {'loss': loss_f + loss_r, **f_terms, **r_terms}
  if 'project_conflicts' in hp:
    grads_f, metrics['grad_cos'] = project_conflict(grads_f, grads_r, hp['project_conflicts'])
  grads = jax.tree_util.tree_map(jnp.add, grads_f, grads_r)
  return grads, (batch_stats, metrics)


def _vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                            jax.tree_util.tree_leaves(b)))


def project_conflict(forget_grads, retain_grads, strength):
  """(forget gradient, cosine of the two): beyond the paper, PCGrad's projection (Yu et al.,
  NeurIPS 2020) of the forget part's gradient. Where it points against the retain part's
  (g_f . g_r < 0) it loses `strength` x its component along g_r,

    g_f <- g_f - strength * min(g_f . g_r, 0) / |g_r|^2 * g_r,

  so at strength 1 a step that pushes the forget embeddings does not, to first order, move the
  batch's retain embeddings away from the original's. Measured (README "What limits it"): the
  push that forgets the forget set also forgets the retain set. Strength 0 is the paper."""
  dot = _vdot(forget_grads, retain_grads)
  norm_r = _vdot(retain_grads, retain_grads)
  norm_f = _vdot(forget_grads, forget_grads)
  tiny = jnp.finfo(jnp.float32).tiny
  coef = strength * jnp.minimum(dot, 0.0) / jnp.maximum(norm_r, tiny)
  projected = jax.tree_util.tree_map(lambda f, r: f - (coef * r).astype(f.dtype), forget_grads,
                                     retain_grads)
  return projected, dot / jnp.sqrt(jnp.maximum(norm_r * norm_f, tiny))


def _after(params, grads):
  """params, made data-dependent on `grads` (adds an exact 0): orders the computation."""
  zero = jax.lax.stop_gradient(jax.tree_util.tree_leaves(grads)[0].ravel()[0]) * 0.0
  return jax.tree_util.tree_map(lambda p: p + zero.astype(p.dtype), params)


# ------------------------------------------------------------------------------ f_o's targets
def noisy_forget_inputs(forget, forget_noisy, hp, *, num_draws, no_noise, resample_noise):
  """The K noisy copies [K, B, ...] of the forget batch (the clean batch, K=1, for no_noise).

  Image noise is keyed by (noise key, sample id[, epoch]): a sample's copy does not depend on
  the batch it lands in, so the cached and the live path see the same noise.
  """
  if no_noise:
    return jax.tree_util.tree_map(lambda x: x[None], model_inputs(forget))
  epoch = hp['epoch'] if resample_noise else None
  images = add_image_noise(hp['noise_key'], forget['image'], forget['id'], hp['noise_mu'],
                           hp['noise_sigma'], num_draws=num_draws, epoch=epoch)
  return {'image': images, 'input_ids': forget_noisy['input_ids'],
          'attention_mask': forget_noisy['attention_mask']}


def original_embeddings(apply_fn, original, inputs, *, train=False, rng=None):
  """f_o's unimodal and joint embeddings of inputs with a leading draw axis [K, B, ...]."""
  def one(x, key):
    out, _ = forward(apply_fn, original['params'], original['batch_stats'], x, train=train,
                     rng=key)
    return out.z_uni, out.z_joint
  keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0),
                          inputs['image'].shape[0])
  return jax.vmap(one)(inputs, keys)


def forget_targets(apply_fn, original, batch, hp, *, num_draws, no_noise, resample_noise,
                   train=False, rng=None):
  noisy = noisy_forget_inputs(batch['forget'], batch['forget_noisy'], hp, num_draws=num_draws,
                              no_noise=no_noise, resample_noise=resample_noise)
  uni, joint = original_embeddings(apply_fn, original, noisy, train=train, rng=rng)
  return {'forget_uni': uni, 'forget_joint': joint}


def retain_targets(apply_fn, original, retain, *, train=False, rng=None):
  inputs = jax.tree_util.tree_map(lambda x: x[None], model_inputs(retain))
  uni, joint = original_embeddings(apply_fn, original, inputs, train=train, rng=rng)
  return {'retain_uni': uni[0], 'retain_joint': joint[0]}


def fresh_gates(init_fusion, rng):
  """REFERENCE 8.1 (opt-in): the public code draws new random fusion gates at every step, one
  per model and set: {(model, set): fusion params} for the unlearned and original models."""
  parts = [('unlearned', 'forget'), ('unlearned', 'retain'), ('original', 'forget'),
           ('original', 'retain')]
  key = jax.random.fold_in(rng, rng_lib.FUSION_GATES)
  return {p: init_fusion(jax.random.fold_in(key, i)) for i, p in enumerate(parts)}


def make_grads_fn(apply_fn, *, num_draws=1, no_noise=False, resample_noise=False,
                  original_train_mode=False, init_fusion=None, train=True):
  """grads(state, original, batch, rng, hparams) -> (grads, batch_stats, metrics).

  Uses `batch['targets']` when the method cached the original's outputs (forget targets
  batch-first [B, T, K, D] over T target settings; `hparams['target_index']` picks this copy's),
  otherwise runs the frozen original live (eval mode; train mode for REFERENCE 8.4).
  `init_fusion(key)` (traceable) turns on REFERENCE 8.1's throw-away gates.
  """
  def grads_fn(state, original, batch, rng, hp):
    gates = fresh_gates(init_fusion, rng) if init_fusion is not None else None
    with_gates = lambda params, model, part: dict(params, fusion=gates[(model, part)])  # noqa
    if 'targets' in batch:
      targets = dict(batch['targets'])
      for k in _TARGET_NAMES:  # [B, T, K, D] -> this copy's [K, B, D]
        targets[k] = jnp.swapaxes(jnp.take(targets[k], hp['target_index'], axis=1), 0, 1)
    else:
      orng = jax.random.fold_in(rng, rng_lib.ORIGINAL_DROPOUT)
      of = original if gates is None else dict(
          original, params=with_gates(original['params'], 'original', 'forget'))
      orr = original if gates is None else dict(
          original, params=with_gates(original['params'], 'original', 'retain'))
      targets = forget_targets(apply_fn, of, batch, hp, num_draws=num_draws,
                               no_noise=no_noise, resample_noise=resample_noise,
                               train=original_train_mode, rng=jax.random.fold_in(orng, 0))
      targets.update(retain_targets(apply_fn, orr, batch['retain'],
                                    train=original_train_mode, rng=jax.random.fold_in(orng, 1)))
    targets = jax.lax.stop_gradient(targets)
    set_params = None if gates is None else (
        lambda params, part: with_gates(params, 'unlearned', part))
    grads, (stats, metrics) = forgetmi_grads(state.params, state.batch_stats, targets, batch,
                                             rng, hp, apply_fn, set_params, train)
    # the gates are never trained: swapped in per set, their gradient is exactly zero
    return grads, stats, metrics
  return grads_fn


# ------------------------------------------------------------------------------ the method
class ForgetMIMethod(UnlearningMethod):
  """Forget-MI on the loop. Copies may differ in seed, lr, loss weights and image noise; the
  frozen original's outputs are computed once per retain image the batches pair (at its first
  use) and once per distinct (seed, noise) setting (forget; again per epoch only when the noise
  is resampled) and shared by all copies.
  """
  name = 'forgetmi'
  frozen_modules = HEAD_NAMES  # the heads get no update and stay bit-identical

  def __init__(self, ctx, copies):
    super().__init__(ctx, copies)
    cfg, quirks = self.cfg, self.cfg.reference_quirks
    for c in self.copies:
      for key in ('original_train_mode', 'cache_original_outputs', 'noise.num_draws',
                  'noise.resample_each_epoch', 'noise.text_mode', 'noise.text_p'):
        if _get(c.cfg, key) != _get(cfg, key):
          raise ValueError(f'forgetmi: copies disagree on {key}; they cannot share a program')
      if c.cfg.reference_quirks.to_dict() != quirks.to_dict():
        raise ValueError('forgetmi: copies disagree on reference_quirks')
      if (c.cfg.setting == 'no_noise') != (cfg.setting == 'no_noise') and not self._cachable():
        raise ValueError('forgetmi: no_noise and noisy copies share a program only with cached '
                         'original outputs')
    self.original_train_mode = bool(cfg.original_train_mode or quirks.original_train_mode)
    if len({bool(c.cfg.train_mode) for c in self.copies}) > 1:
      raise ValueError('forgetmi: copies disagree on train_mode; they cannot share a program')
    self.train_mode = bool(cfg.train_mode)
    self.replay = bool(quirks.replay_retain)
    self.resample = bool(cfg.noise.resample_each_epoch) and not self.replay
    self.accumulate = bool(quirks.epoch_accumulation)
    self.cap = bool(quirks.retention_cap)
    self.num_draws = int(cfg.noise.num_draws)
    self.projects = any(float(c.cfg.get('project_conflicts', 0.0)) > 0 for c in self.copies)
    self.cached = self._cachable()
    init_fusion = ctx.init_fusion if quirks.random_fusion_gates else None
    self.grads_fn = make_grads_fn(ctx.apply_fn, num_draws=self.num_draws,
                                  no_noise=cfg.setting == 'no_noise',
                                  resample_noise=self.resample,
                                  original_train_mode=self.original_train_mode,
                                  init_fusion=init_fusion, train=self.train_mode)
    self._forget_targets_fns = {
        no_noise: jax.jit(lambda o, b, h, no_noise=no_noise: forget_targets(
            ctx.apply_fn, o, b, h, num_draws=self.num_draws, no_noise=no_noise,
            resample_noise=self.resample)) for no_noise in (False, True)}
    self._retain_targets_fn = jax.jit(lambda o, b: retain_targets(ctx.apply_fn, o, b['forget']))
    self._apply_accumulated = jax.jit(jax.vmap(lambda s: s.apply_accumulated()))
    self._drop_accumulated = jax.jit(jax.vmap(
        lambda s: s.replace(grad_acc=jax.tree_util.tree_map(jnp.zeros_like, s.grad_acc))))
    self.targets = {}  # 'retain', and per target key: forget targets (shared with chunks)
    self.original = None
    self.bounds = None  # {'uu', 'mu'}: the forget-term bounds (forget_bound='validation')

  def _cachable(self):
    """Cached targets need a deterministic original: eval mode, and no fresh gates."""
    cfg = self.cfg
    return (bool(cfg.cache_original_outputs) and not cfg.original_train_mode
            and not cfg.reference_quirks.original_train_mode
            and not cfg.reference_quirks.random_fusion_gates)

  def accumulates(self):
    return self.accumulate

  # -- per-copy settings ------------------------------------------------------------------
  @staticmethod
  def target_key(copy):
    """Copies with equal keys share the frozen original's forget targets."""
    if copy.cfg.setting == 'no_noise':
      return ('clean',)
    return (int(copy.seed), float(copy.cfg.noise.image_mu), float(copy.cfg.noise.image_sigma))

  def _keys_of_seed(self, seed):
    keys = [self.target_key(c) for c in self.copies if int(c.seed) == int(seed)]
    return list(dict.fromkeys(keys))

  def _noise_hparams(self, copy, epoch=0):
    cfg = copy.cfg
    return {'noise_mu': jnp.float32(cfg.noise.image_mu),
            'noise_sigma': jnp.float32(cfg.noise.image_sigma),
            'noise_key': rng_lib.key(copy.seed, rng_lib.IMAGE_NOISE),
            'epoch': jnp.int32(epoch)}

  def hparams(self, copy):
    weights = normalised_weights(copy.cfg.loss_weights, self.cfg.reference_quirks.round_weights)
    shared = self.shared_batch
    keys = self._keys_of_seed(copy.seed) if not shared else list(
        dict.fromkeys(self.target_key(c) for c in self.copies))
    return {**self._noise_hparams(copy),
            'loss_weights': {k: jnp.float32(v) for k, v in weights.items()},
            'retention_cap': {'ur': jnp.float32(NO_CAP), 'mr': jnp.float32(NO_CAP)},
            'forget_bound': {'uu': jnp.float32(NO_CAP), 'mu': jnp.float32(NO_CAP)},
            'target_index': jnp.int32(keys.index(self.target_key(copy))),
            # only when some copy projects: the paper's step computes no gradient products
            **({'project_conflicts': jnp.float32(copy.cfg.get('project_conflicts', 0.0))}
               if self.projects else {})}

  # -- data -------------------------------------------------------------------------------
  def seed_batches(self, epoch, seed):
    return super().seed_batches(0 if self.replay else epoch, seed)

  def epoch_examples(self, epoch):
    full = self.full_retain_pass()
    return self.paired_examples(len(self.ctx.split.retain_idx) if full else None)

  def step_rng(self, seed, epoch, index):
    return super().step_rng(seed, 0 if self.replay else epoch, index)

  # -- the frozen original's outputs, computed once -----------------------------------------
  def prepare(self, original):
    self.original = original
    if self.bounded() and self.bounds is None:
      self.bounds = non_member_spread(self.ctx.source, self.ctx.split.val_idx,
                                      lambda b: self._retain_targets_fn(original, b))
    if self.cached:  # a later chunk starts again from epoch 0's (resampled) noise
      self._forget_targets(0, recompute=self.resample)

  def _forget_targets(self, epoch, recompute):
    for copy in self.copies:
      key = self.target_key(copy)
      if key in self.targets and not recompute:
        continue
      fn, hp = self._forget_targets_fns[key == ('clean',)], self._noise_hparams(copy, epoch)
      self.targets[key] = self._gather(
          self.ctx.split.forget_idx, int(self.cfg.batch_size),
          lambda b, fn=fn, hp=hp: fn(self.original, b, hp), draw_axis=True)

  def _retain_targets(self, epoch, ids):
    """The cached f_o embeddings, first computed for the retain images this epoch pairs (every
    seed's sample, and any of `ids` not yet cached): a push of a few epochs reads a few
    hundred of them, not the whole retain set."""
    cache = self.targets.get('retain')
    ids = np.asarray(ids, np.int64)
    if cache is not None and np.all(cache['row'][ids] >= 0):
      return cache
    e = 0 if self.replay else epoch
    n = len(self.ctx.split.retain_idx if self.full_retain_pass() else self.ctx.split.forget_idx)
    wanted = np.unique(np.concatenate(
        [ids] + [self.retain_sampler(s).epoch(e, n) for s in set(self.seeds)]))
    if cache is not None:
      wanted = wanted[cache['row'][wanted] < 0]
    fn = self._retain_targets_fn
    new = self._gather(wanted, 64, lambda b: fn(self.original, b), draw_axis=False)
    if cache is None:
      cache = new
    else:
      offset = len(cache['retain_uni'])
      row = cache['row'].copy()
      row[wanted] = new['row'][wanted] + offset
      cache = {k: np.concatenate([cache[k], new[k]]) for k in ('retain_uni', 'retain_joint')}
      cache['row'] = row
    self.targets['retain'] = cache
    return cache

  def _gather(self, indices, batch_size, fn, draw_axis):
    """Run fn over `indices` in fixed-size batches; arrays plus an id -> row lookup."""
    rows = np.full(len(self.ctx.source), -1, np.int64)
    parts, count = {}, 0
    forget = draw_axis
    for batch in target_batches(self.ctx.source, indices, batch_size,
                                self.ctx.noisy_tokens if forget else None,
                                buckets=self.ctx.text_buckets):
      out = jax.device_get(fn(batch))
      real = np.asarray(batch['forget']['mask']) > 0
      ids = np.asarray(batch['forget']['id'])[real]
      for k, v in out.items():
        v = np.asarray(v)
        parts.setdefault(k, []).append(v[:, real] if draw_axis else v[real])
      rows[ids] = np.arange(count, count + len(ids))
      count += len(ids)
    result = {k: np.concatenate(v, axis=1 if draw_axis else 0) for k, v in parts.items()}
    result['row'] = rows
    return result

  def bounded(self):
    modes = {c.cfg.get('forget_bound', 'none') for c in self.copies}
    if modes - {'none', 'validation'}:
      raise ValueError(f"forgetmi.forget_bound must be 'none' or 'validation', got {modes}")
    return 'validation' in modes

  def start_epoch(self, epoch, hparams):
    if self.cached and self.resample and epoch > 0:
      self._forget_targets(epoch, recompute=True)
    hparams = dict(hparams, epoch=jnp.full_like(hparams['epoch'], epoch))
    if self.bounds is not None:  # per copy: the non-member spread, or unbounded
      on = np.array([c.cfg.get('forget_bound', 'none') == 'validation' for c in self.copies])
      hparams['forget_bound'] = {k: jnp.asarray(np.where(on, self.bounds[k], NO_CAP),
                                                jnp.float32) for k in ('uu', 'mu')}
    return hparams

  def prepare_batch(self, batch, epoch, seed):
    """Attach the cached targets of this seed's target settings: forget [B, T, K, D]."""
    if not self.cached:
      return batch
    keys = (list(dict.fromkeys(self.target_key(c) for c in self.copies)) if self.shared_batch
            else self._keys_of_seed(seed))
    width = max(len(self._keys_of_seed(s)) for s in set(self.seeds)) if not self.shared_batch \
        else len(keys)
    keys = keys + [keys[-1]] * (width - len(keys))
    f_ids, r_ids = batch['forget']['id'], batch['retain']['id']
    retain = self._retain_targets(epoch, r_ids)
    targets = {'retain_uni': retain['retain_uni'][retain['row'][r_ids]],
               'retain_joint': retain['retain_joint'][retain['row'][r_ids]]}
    for name in _TARGET_NAMES:
      per_key = []
      for key in keys:
        t = self.targets[key]
        x = np.swapaxes(t[name][:, t['row'][f_ids]], 0, 1)  # [B, K, D]
        if x.shape[1] != self.num_draws:  # the clean targets have K = 1
          x = np.repeat(x, self.num_draws // x.shape[1], axis=1)
        per_key.append(x)
      targets[name] = np.stack(per_key, axis=1)
    return dict(batch, targets=targets)

  # -- the step ---------------------------------------------------------------------------
  def step(self, state, original, batch, rng, hparams):
    grads, stats, metrics = self.grads_fn(state, original, batch, rng, hparams)
    # a frozen trunk keeps the original's BatchNorm statistics (XLA then drops its forward)
    stats = keep_frozen_stats(state.batch_stats, stats, self.trainable(state.batch_stats))
    if self.accumulate:  # REFERENCE 8.2: sum the epoch's gradients, step in end_epoch
      return state.accumulate(grads, batch_stats=stats), metrics
    return state.apply_gradients(grads, batch_stats=stats), metrics

  def end_epoch(self, epoch, states, hparams, last):
    if self.accumulate:  # one step per epoch on the summed gradients, none in epoch 0
      states = self._apply_accumulated(states) if epoch > 0 else self._drop_accumulated(states)
    if self.cap and epoch == 0:  # REFERENCE 8.3: cap = value at epoch 0's last step + 1
      n = len(self.copies)
      hparams = dict(hparams, retention_cap={
          k: jnp.asarray(np.asarray(last.get(k, np.full(n, NO_CAP))) + 1.0, jnp.float32)
          for k in ('ur', 'mr')})
    return states, hparams


def non_member_spread(source, val_idx, embed, batch_size=64):
  """{'uu', 'mu'}: the mean distance between f_o's embeddings (unimodal, joint) of two
  different validation non-members, over all pairs. Beyond the paper, a forget sample pushed
  this far from f_o's embedding of its noisy copy is as far as another patient: the bound of
  its forget terms. `embed(batch)` gives {'retain_uni', 'retain_joint'} of batch['forget']."""
  if len(val_idx) < 2:
    raise ValueError('forgetmi.forget_bound=validation needs >= 2 validation images '
                     '(data.val_fraction)')
  parts = {'retain_uni': [], 'retain_joint': []}
  for batch in target_batches(source, val_idx, batch_size):
    out = jax.device_get(embed(batch))
    real = np.asarray(batch['forget']['mask']) > 0
    for k in parts:
      parts[k].append(np.asarray(out[k], np.float64)[real])
  result = {}
  for term, k in (('uu', 'retain_uni'), ('mu', 'retain_joint')):
    z = np.concatenate(parts[k])
    sq = np.sum(z ** 2, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    iu = np.triu_indices(len(z), k=1)
    result[term] = float(np.mean(np.sqrt(d2[iu])))
  return result


class ForgetMIPaperMethod(ForgetMIMethod):
  """The paper's Forget-MI as given (config.forgetmi_paper: unbounded, fixed schedule)."""
  name = 'forgetmi_paper'


def _get(cfg, dotted):
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg
