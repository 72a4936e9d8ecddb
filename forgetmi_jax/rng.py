"""Every purpose a random key is folded in with, in one table.

One root key per copy, `jax.random.PRNGKey(seed)`; a draw is reproduced alone from
(seed, purpose[, epoch][, step][, sample id]). The values are fixed: changing one changes results.
"""
import jax

TRAIN_DROPOUT = 1  # original / retrained model training: fold_in(root, 1) then the global step
FORGET_DROPOUT = 11  # Forget-MI: the unlearned model on the forget set
RETAIN_DROPOUT = 12  # Forget-MI: the unlearned model on the retain set
IMAGE_NOISE = 13  # Forget-MI: Gaussian image noise, then (sample id[, epoch], draw)
FUSION_GATES = 14  # REFERENCE 8.1: fresh gates, then (model, set) index 0..3
ORIGINAL_DROPOUT = 15  # REFERENCE 8.4: the original in train mode
NEGGRAD_FORGET_DROPOUT = 21
NEGGRAD_RETAIN_DROPOUT = 22
SCRUB_DROPOUT = 31
CF_K_DROPOUT = 41
MULTIDELETE_FORGET_DROPOUT = 51
MULTIDELETE_RETAIN_DROPOUT = 52
MULTIDELETE_PERMUTE = 53
MONITOR_RETAIN = 61  # host numpy: the validation monitor's fixed retain sample
REPAIR_FORGET_DROPOUT = 71  # Forget-MI+'s repair phase: the model on the forget set
REPAIR_RETAIN_DROPOUT = 72  # ... and on the retain set
EU_K_REINIT = 8111  # EU-k: the fresh init of the re-initialised blocks
UNLEARN_STEP = 104729  # unlearning step keys: fold_in(root, UNLEARN_STEP + epoch), then the step
# Host-side numpy draws (forgetmi_jax/data): batch order np.random.default_rng([seed, epoch, 1]),
# forget-set order [seed, epoch, 2]; retrained model data order seed + 1, baseline retain passes
# seed + 2; text noise keyed by (seed, image id, draw) in data/noise.py; the validation
# monitor's retain sample [eval.mia_seed, MONITOR_RETAIN].

PURPOSES = {name: value for name, value in globals().items()
            if name.isupper() and isinstance(value, int)}
assert len(set(PURPOSES.values())) == len(PURPOSES), 'two purposes share a value'


def root(seed: int):
  return jax.random.PRNGKey(int(seed))


def key(seed: int, purpose: int, *indices: int):
  """fold_in(root(seed), purpose), then each index in turn."""
  k = jax.random.fold_in(root(seed), purpose)
  for i in indices:
    k = jax.random.fold_in(k, i)
  return k
