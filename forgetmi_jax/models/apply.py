"""Running the multimodal model the way every step and evaluator does.

The frozen original and every model copy are `{'params', 'batch_stats'}` variables dicts; these
helpers are the one place that knows how a batch dict becomes the model's positional inputs.
"""


def model_inputs(x):
  """The model's inputs of a batch dict (drops labels, ids and masks)."""
  return {'image': x['image'], 'input_ids': x['input_ids'], 'attention_mask': x['attention_mask']}


def forward(apply_fn, params, batch_stats, inputs, *, train: bool, rng=None):
  """Run the multimodal model; returns (ModelOutputs, new batch_stats).

  In eval mode BatchNorm uses running statistics and dropout is off, so the frozen original
  gives the same outputs on every call; in train mode the batch statistics are updated.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  args = (inputs['image'], inputs['input_ids'], inputs['attention_mask'])
  if train:
    out, mutated = apply_fn(variables, *args, train=True, rngs={'dropout': rng},
                            mutable=['batch_stats'])
    return out, mutated['batch_stats']
  return apply_fn(variables, *args, train=False), batch_stats


def eval_outputs(apply_fn, variables, inputs):
  """A frozen model's outputs in eval mode (running BN statistics, no dropout)."""
  out, _ = forward(apply_fn, variables['params'], variables['batch_stats'], inputs, train=False)
  return out
