"""Running the multimodal model the way every step and evaluator does.

The frozen original and every model copy are `{'params', 'batch_stats'}` variables dicts; these
helpers are the one place that knows how a batch dict becomes the model's positional inputs.
A batch may carry `trunk` ({'<encoder>/<module>': activation}, unlearning/trunk.py): those
modules' outputs are taken from it instead of computed, and XLA drops what fed them.
"""
import flax.linen as nn

TRUNK_KEY = 'trunk'


def model_inputs(x):
  """The model's inputs of a batch dict (drops labels, ids and masks; keeps a trunk)."""
  inputs = {'image': x['image'], 'input_ids': x['input_ids'],
            'attention_mask': x['attention_mask']}
  if TRUNK_KEY in x:
    inputs[TRUNK_KEY] = x[TRUNK_KEY]
  return inputs


def substitute(outputs):
  """A flax interceptor returning `outputs['<module path>']` for those modules' calls."""
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      value = outputs.get('/'.join(context.module.path))
      if value is not None:
        return value
    return next_fun(*args, **kwargs)
  return interceptor


def _apply(apply_fn, variables, args, trunk, **kwargs):
  if not trunk:
    return apply_fn(variables, *args, **kwargs)
  with nn.intercept_methods(substitute(trunk)):
    return apply_fn(variables, *args, **kwargs)


def forward(apply_fn, params, batch_stats, inputs, *, train: bool, rng=None):
  """Run the multimodal model; returns (ModelOutputs, new batch_stats).

  In eval mode BatchNorm uses running statistics and dropout is off, so the frozen original
  gives the same outputs on every call; in train mode the batch statistics are updated.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  args = (inputs['image'], inputs['input_ids'], inputs['attention_mask'])
  trunk = inputs.get(TRUNK_KEY)
  if train:
    out, mutated = _apply(apply_fn, variables, args, trunk, train=True, rngs={'dropout': rng},
                          mutable=['batch_stats'])
    return out, mutated['batch_stats']
  return _apply(apply_fn, variables, args, trunk, train=False), batch_stats


def eval_outputs(apply_fn, variables, inputs):
  """A frozen model's outputs in eval mode (running BN statistics, no dropout)."""
  out, _ = forward(apply_fn, variables['params'], variables['batch_stats'], inputs, train=False)
  return out
