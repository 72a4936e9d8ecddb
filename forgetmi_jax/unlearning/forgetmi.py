"""Forget-MI (Hardan et al., MICCAI 2025): the four embedding losses and the pure step.

Push the forget pairs' unimodal (UU) and joint (MU) embeddings away from the frozen original's
embeddings of noisy copies of them; keep the retain pairs' unimodal (UR) and joint (MR)
embeddings where the original put them. Distances are per-sample Euclidean (not squared),
averaged over the batch (and over the K noise draws); weights normalised to sum 1.
The frozen original is an argument pytree, never closed over, and the weights are traced, so
a grid of weight settings reuses one compilation.
"""
import jax
import jax.numpy as jnp
import numpy as np

from forgetmi_jax.data.noise import add_image_noise
from forgetmi_jax.train.common import forward, masked_mean, safe_norm
from forgetmi_jax.train.state import HEAD_NAMES
from forgetmi_jax.unlearning.common import Method

LOSS_NAMES = ('ur', 'uu', 'mu', 'mr')
DROPOUT_FORGET, DROPOUT_RETAIN, NOISE, GATES, ORIGINAL_DROPOUT = 11, 12, 13, 14, 15


def weight_vector(loss_weights, round_to_2=False):
  """Weights in LOSS_NAMES order, normalised to sum 1 (optionally rounded like the code)."""
  w = np.array([float(loss_weights[k]) for k in LOSS_NAMES], np.float32)
  if np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f'loss weights must be >= 0 with a positive sum, got {dict(loss_weights)}')
  w = w / w.sum()
  if round_to_2:
    w = np.round(w, 2)
  return w


def _model_inputs(x):
  return {'image': x['image'], 'input_ids': x['input_ids'], 'attention_mask': x['attention_mask']}


def noisy_forget_inputs(batch, hp, *, num_draws, no_noise, resample_noise):
  """The K noisy copies [K, B, ...] of the forget batch (the clean batch, K=1, for no_noise).

  Image noise is keyed by (noise key, sample id[, epoch]): a sample's copy does not depend on
  the batch it lands in, so the cached and the live path see the same noise.
  """
  forget = batch['forget']
  if no_noise:
    return jax.tree_util.tree_map(lambda x: x[None], _model_inputs(forget))
  epoch = hp['epoch'] if resample_noise else None
  images = add_image_noise(hp['noise_key'], forget['image'], forget['id'], hp['noise_mu'],
                           hp['noise_sigma'], num_draws=num_draws, epoch=epoch)
  return {'image': images, 'input_ids': batch['forget_noisy']['input_ids'],
          'attention_mask': batch['forget_noisy']['attention_mask']}


def original_embeddings(apply_fn, params, batch_stats, inputs, *, train=False, rng=None):
  """f_o's unimodal and joint embeddings of inputs with a leading draw axis [K, B, ...]."""
  def one(x, key):
    out, _ = forward(apply_fn, params, batch_stats, x, train=train, rng=key)
    return out.z_uni, out.z_joint
  keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0),
                          inputs['image'].shape[0])
  return jax.vmap(one)(inputs, keys)


def forget_targets(apply_fn, original_params, original_batch_stats, batch, hp, *, num_draws,
                   no_noise, resample_noise, train=False, rng=None):
  noisy = noisy_forget_inputs(batch, hp, num_draws=num_draws, no_noise=no_noise,
                              resample_noise=resample_noise)
  uni, joint = original_embeddings(apply_fn, original_params, original_batch_stats, noisy,
                                   train=train, rng=rng)
  return {'forget_uni': uni, 'forget_joint': joint}


def retain_targets(apply_fn, original_params, original_batch_stats, retain, *, train=False,
                   rng=None):
  inputs = jax.tree_util.tree_map(lambda x: x[None], _model_inputs(retain))
  uni, joint = original_embeddings(apply_fn, original_params, original_batch_stats, inputs,
                                   train=train, rng=rng)
  return {'retain_uni': uni[0], 'retain_joint': joint[0]}


def _sets(targets, batch, rng, hp):
  """[forget, retain]: each set's inputs, targets and loss coefficients.

  Both sets get the same treatment: distances to the original's embeddings (averaged over the
  K draws; retain has one), weighted by `coef` (negative for forget: pushed away) and capped
  (REFERENCE 8.3, opt-in, retain only; the default cap of 1e30 never binds).
  """
  forget, retain = batch['forget'], batch['retain']
  w = hp['loss_weights']
  return [
      {'inputs': _model_inputs(forget), 'mask': forget['mask'],
       'uni': targets['forget_uni'], 'joint': targets['forget_joint'],
       'coef': -w[jnp.array([1, 2])], 'cap': jnp.full((2,), jnp.inf),
       'rng': jax.random.fold_in(rng, DROPOUT_FORGET)},
      {'inputs': _model_inputs(retain), 'mask': retain['mask'],
       'uni': targets['retain_uni'][None], 'joint': targets['retain_joint'][None],
       'coef': w[jnp.array([0, 3])], 'cap': hp['retention_cap'],
       'rng': jax.random.fold_in(rng, DROPOUT_RETAIN)},
  ]


def set_loss(params, batch_stats, one_set, apply_fn):
  """One set's weighted loss -> (loss, (batch_stats, [mean unimodal, mean joint distance]))."""
  out, stats = forward(apply_fn, params, batch_stats, one_set['inputs'], train=True,
                       rng=one_set['rng'])
  mean_distance = lambda z, t: masked_mean(  # noqa: E731
      jnp.mean(safe_norm(z[None] - t), axis=0), one_set['mask'])
  d = jnp.stack([mean_distance(out.z_uni, one_set['uni']),
                 mean_distance(out.z_joint, one_set['joint'])])
  d_eff = jnp.where(d > one_set['cap'], jax.lax.stop_gradient(d), d)
  return one_set['coef'] @ d_eff, (stats, d)


def _metrics(losses, distances):
  """Set losses [forget, retain] and distances [(uni, joint) per set] -> the logged terms."""
  return {'loss': losses[0] + losses[1], 'ur': distances[1][0], 'uu': -distances[0][0],
          'mu': -distances[0][1], 'mr': distances[1][1]}


def forgetmi_loss(params, batch_stats, targets, batch, rng, hp, apply_fn):
  """Total loss and the four terms; `targets` come from the frozen original.

  The forget set runs first, then the retain set; BatchNorm statistics are threaded through.
  """
  losses, distances = [], []
  for one_set in _sets(targets, batch, rng, hp):
    loss, (batch_stats, d) = set_loss(params, batch_stats, one_set, apply_fn)
    losses.append(loss)
    distances.append(d)
  metrics = _metrics(losses, distances)
  return metrics['loss'], (batch_stats, metrics)


def forgetmi_grads(params, batch_stats, targets, batch, rng, hp, apply_fn):
  """Gradient of forgetmi_loss -> (grads, (batch_stats, metrics)), one set at a time.

  The loss is a forget part plus a retain part sharing only the params (and BatchNorm
  statistics, threaded forget -> retain), so its gradient is the sum of theirs. The retain
  part reads the params through a zero that depends on the forget part's gradient, so XLA
  cannot start the retain forward before the forget backward has freed its activations:
  peak memory is one set's, not both (XLA:CPU drops optimization barriers and, without
  this, keeps both sets' activations: 24.4 instead of 18.1 GB at paper size, batch 16).
  """
  forget_set, retain_set = _sets(targets, batch, rng, hp)
  grad_fn = jax.value_and_grad(set_loss, has_aux=True)
  (loss_f, (batch_stats, d_f)), grads_f = grad_fn(params, batch_stats, forget_set, apply_fn)
  (loss_r, (batch_stats, d_r)), grads_r = grad_fn(_after(params, grads_f), batch_stats,
                                                  retain_set, apply_fn)
  grads = jax.tree_util.tree_map(jnp.add, grads_f, grads_r)
  return grads, (batch_stats, _metrics([loss_f, loss_r], [d_f, d_r]))


def _after(params, grads):
  """params, made data-dependent on `grads` (adds an exact 0): orders the computation."""
  zero = jax.lax.stop_gradient(jax.tree_util.tree_leaves(grads)[0].ravel()[0]) * 0.0
  return jax.tree_util.tree_map(lambda p: p + zero.astype(p.dtype), params)


def make_grads_fn(apply_fn, *, num_draws=1, no_noise=False, resample_noise=False,
                  original_train_mode=False, init_fusion=None):
  """grads(state, original_params, original_batch_stats, batch, rng, hparams).

  Uses `batch['targets']` when the loop cached the original's outputs, otherwise runs the
  frozen original live (eval mode by default; train mode for REFERENCE 8.4).
  """
  def grads_fn(state, original_params, original_batch_stats, batch, rng, hp):
    params = state.params
    if init_fusion is not None:  # REFERENCE 8.1: fresh random gates per model and set
      params = randomise_fusion(params, init_fusion, jax.random.fold_in(rng, GATES))
      original_params = randomise_fusion(original_params, init_fusion,
                                         jax.random.fold_in(rng, GATES + 100))
    if 'targets' in batch:  # cached outputs travel batch-first [B, K, D] to shard with it
      targets = dict(batch['targets'])
      for k in ('forget_uni', 'forget_joint'):
        targets[k] = jnp.swapaxes(targets[k], 0, 1)
    else:
      orng = jax.random.fold_in(rng, ORIGINAL_DROPOUT)
      targets = forget_targets(apply_fn, original_params, original_batch_stats, batch, hp,
                               num_draws=num_draws, no_noise=no_noise,
                               resample_noise=resample_noise, train=original_train_mode,
                               rng=jax.random.fold_in(orng, 0))
      targets.update(retain_targets(apply_fn, original_params, original_batch_stats,
                                    batch['retain'], train=original_train_mode,
                                    rng=jax.random.fold_in(orng, 1)))
    targets = jax.lax.stop_gradient(targets)
    grads, (stats, metrics) = forgetmi_grads(params, state.batch_stats, targets, batch, rng,
                                             hp, apply_fn)
    if init_fusion is not None:  # the public code never trains its throw-away gates
      grads = dict(grads)
      grads['fusion'] = jax.tree_util.tree_map(jnp.zeros_like, grads['fusion'])
    return grads, stats, metrics
  return grads_fn


def make_unlearn_step(apply_fn, **static):
  """The pure, jitted Forget-MI step:
  unlearn_step(state, original_params, original_batch_stats, batch, rng, hparams)
  -> (new_state, metrics). hparams = loss_weights [4] (UR, UU, MU, MR order), noise_mu,
  noise_sigma, noise_key, epoch, retention_cap [2]."""
  grads_fn = make_grads_fn(apply_fn, **static)

  @jax.jit
  def unlearn_step(state, original_params, original_batch_stats, batch, rng, hparams):
    grads, stats, metrics = grads_fn(state, original_params, original_batch_stats, batch, rng,
                                     hparams)
    return state.apply_gradients(grads, batch_stats=stats), metrics
  return unlearn_step


def randomise_fusion(params, init_fusion, key):
  """REFERENCE 8.1 (opt-in): the public code builds fresh random fusion gates every step."""
  params = dict(params)
  params['fusion'] = init_fusion(key)
  return params


NO_CAP = 1e30


class ForgetMIMethod(Method):
  name = 'forgetmi'
  frozen = HEAD_NAMES  # the heads get no update and stay bit-identical

  def __init__(self, ctx, method_cfg):
    super().__init__(ctx, method_cfg)
    cfg, quirks = method_cfg, method_cfg.reference_quirks
    self.no_noise = cfg.setting == 'no_noise'
    self.original_train_mode = bool(cfg.original_train_mode or quirks.original_train_mode)
    self.replay = bool(quirks.replay_retain)
    self.resample = bool(cfg.noise.resample_each_epoch) and not self.replay
    self.accumulate = bool(quirks.epoch_accumulation)
    self.cap = bool(quirks.retention_cap)
    # Cached targets need a deterministic original: eval mode, and fresh gates rule it out.
    self.cached = (bool(cfg.cache_original_outputs) and not self.original_train_mode
                   and not quirks.random_fusion_gates)
    init_fusion = None
    if quirks.random_fusion_gates:
      init_fusion = lambda key: ctx.init_params(key)['fusion']
    static = dict(num_draws=int(cfg.noise.num_draws), no_noise=self.no_noise,
                  resample_noise=self.resample, original_train_mode=self.original_train_mode,
                  init_fusion=init_fusion)
    self.static = static
    self.grads_fn = jax.jit(make_grads_fn(ctx.apply_fn, **static))
    self.unlearn_step = make_unlearn_step(ctx.apply_fn, **static)
    # Compiled once: the forget targets are recomputed every epoch when noise is resampled.
    self._forget_targets_fn = jax.jit(lambda op, ob, b, h: forget_targets(
        ctx.apply_fn, op, ob, b, h, num_draws=static['num_draws'], no_noise=self.no_noise,
        resample_noise=self.resample))
    self._retain_targets_fn = jax.jit(
        lambda op, ob, b: retain_targets(ctx.apply_fn, op, ob, b['forget']))
    self.targets = None
    self._acc = None

  def hparams(self):
    cfg = self.cfg
    return {
        'loss_weights': jnp.asarray(weight_vector(cfg.loss_weights,
                                                  cfg.reference_quirks.round_weights)),
        'noise_mu': jnp.float32(cfg.noise.image_mu),
        'noise_sigma': jnp.float32(cfg.noise.image_sigma),
        'noise_key': jax.random.fold_in(jax.random.PRNGKey(int(self.ctx.config.seed)), NOISE),
        'epoch': jnp.int32(0),
        'retention_cap': jnp.full((2,), NO_CAP, jnp.float32),
    }

  def epoch_batches(self, epoch):
    return super().epoch_batches(0 if self.replay else epoch)

  def step_rng(self, epoch, index):
    return super().step_rng(0 if self.replay else epoch, index)

  # ---- cached original outputs -----------------------------------------------------------
  def prepare(self, original):
    if self.cached:
      self.targets = {'retain': self._retain_targets(original)}

  def start_epoch(self, epoch, hparams, original):
    hparams = dict(hparams, epoch=jnp.int32(epoch))
    if self.cached and (self.resample or 'forget' not in self.targets):
      self.targets['forget'] = self._forget_targets(original, hparams)
    return hparams

  def _forget_targets(self, original, hp):
    fn = self._forget_targets_fn
    return _gather_over(self.ctx, self.ctx.split.forget_idx, int(self.cfg.batch_size),
                        lambda b: fn(original.params, original.batch_stats, b, hp),
                        forget=True, draw_axis=True)

  def _retain_targets(self, original):
    fn = self._retain_targets_fn
    return _gather_over(self.ctx, self.ctx.split.retain_idx, 64,
                        lambda b: fn(original.params, original.batch_stats, b),
                        forget=False, draw_axis=False)

  def prepare_batch(self, batch, epoch):
    if not self.cached:
      return batch
    f_rows = self.targets['forget']['row'][batch['forget']['id']]
    r_rows = self.targets['retain']['row'][batch['retain']['id']]
    batch = dict(batch)
    batch['targets'] = {
        'forget_uni': self.targets['forget']['forget_uni'][:, f_rows],
        'forget_joint': self.targets['forget']['forget_joint'][:, f_rows],
        'retain_uni': self.targets['retain']['retain_uni'][r_rows],
        'retain_joint': self.targets['retain']['retain_joint'][r_rows]}
    return _targets_batch_first(batch)

  # ---- the step ---------------------------------------------------------------------------
  def step(self, state, original, batch, rng, hparams):
    if not self.accumulate:
      return self.unlearn_step(state, original.params, original.batch_stats, batch, rng,
                               hparams)
    grads, stats, metrics = self.grads_fn(state, original.params, original.batch_stats,
                                          batch, rng, hparams)
    self._acc = grads if self._acc is None else jax.tree_util.tree_map(
        jnp.add, self._acc, grads)
    return state.replace(batch_stats=stats), metrics

  def end_epoch(self, epoch, state, hparams, last):
    if self.accumulate:  # REFERENCE 8.2: one step per epoch on summed grads, none in epoch 0
      if epoch > 0 and self._acc is not None:
        state = state.apply_gradients(self._acc)
      self._acc = None
    if self.cap and epoch == 0:  # REFERENCE 8.3: cap = value at epoch 0's last step + 1
      hparams = dict(hparams, retention_cap=jnp.asarray(
          [last.get('ur', NO_CAP) + 1.0, last.get('mr', NO_CAP) + 1.0], jnp.float32))
    return state, hparams



def _targets_batch_first(batch):
  """Cached forget targets travel batch-first so they shard with the batch."""
  t = dict(batch['targets'])
  for k in ('forget_uni', 'forget_joint'):
    t[k] = np.swapaxes(np.asarray(t[k]), 0, 1)
  return dict(batch, targets=t)


def _gather_over(ctx, indices, batch_size, fn, forget, draw_axis):
  """Run fn over `indices` in fixed-size batches; return arrays plus an id -> row lookup."""
  from forgetmi_jax.data.pipeline import target_batches
  rows = np.full(len(ctx.source), -1, np.int64)
  parts = {}
  count = 0
  for batch in target_batches(ctx.source, indices, batch_size, ctx.noisy_tokens if forget else None):
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
