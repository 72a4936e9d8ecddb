"""Forget-MI+'s frozen trunk: where it cuts, that the cut forward is the model's own forward, and
that a run trains only the top while every trunk leaf stays the original's."""
import copy

import jax
import numpy as np
import pytest

from forgetmi_jax.models.apply import forward, model_inputs
from forgetmi_jax.runs import setup
from forgetmi_jax.unlearning import trunk as trunk_lib
from forgetmi_jax.unlearning.blocks import encoder_blocks
from forgetmi_jax.train.optim import path_names
from tests.helpers import tiny_config


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('trunk'), **{
      'forgetmi.repair.epochs': 1, 'forgetmi.repair.retain_examples': 16})
  return setup.prepare(config)


def _trunk(prep, variables, k_image, k_text, rows=None):
  cut = trunk_lib.cut_modules(variables['params'], k_image, k_text)
  rows = np.arange(len(prep.source)) if rows is None else rows
  outputs, row = trunk_lib.compute_outputs(prep.model.apply, variables, prep.source, rows,
                                           cut, batch_size=8)
  return trunk_lib.Trunk(k_image, k_text, cut, outputs, row)


def test_cut_names_the_last_frozen_module(prep):
  params = prep.init_variables(0)['params']
  image = encoder_blocks(params, 'image_encoder')
  text = encoder_blocks(params, 'text_encoder')
  assert len(image) >= 2 and len(text) >= 1
  assert trunk_lib.cut_modules(params, 1, 0) == (f'image_encoder/{image[-2]}',
                                                 f'text_encoder/{text[-1]}')
  # k covering every block: the trunk is the stem / the embeddings
  assert trunk_lib.cut_modules(params, len(image), len(text)) == (
      'image_encoder/stem_bn', 'text_encoder/embeddings')
  assert trunk_lib.cut_modules(params, 99, 99) == ('image_encoder/stem_bn',
                                                   'text_encoder/embeddings')


def test_trunk_group_switch_and_checks(prep):
  group = copy.deepcopy(prep.config.forgetmi)
  assert trunk_lib.trunk_group(group) is None  # default: the whole model trains
  group.trunk.k_image, group.trunk.k_text = 2, 1
  assert trunk_lib.trunk_group(group) == (2, 1)
  group.trunk.k_text = -1
  with pytest.raises(ValueError, match='trunk.k_image=2 and trunk.k_text=-1'):
    trunk_lib.trunk_group(group)
  assert trunk_lib.trunk_group(prep.config.forgetmi_paper) is None  # the paper has none


@pytest.mark.parametrize('k', [(1, 0), (1, 1), (3, 1)])
def test_cut_forward_is_the_whole_models_forward(prep, k):
  """Eval mode: substituting the cached trunk outputs gives the model's own outputs, every
  embedding and head, on a batch at its full text length."""
  variables = prep.init_variables(0)
  rows = np.asarray(prep.split.forget_idx[:6])
  trunk = _trunk(prep, variables, *k, rows=rows)
  source = trunk_lib.TrunkSource(prep.source, trunk)
  cut_batch, plain = source.get_batch(rows), prep.source.get_batch(rows)
  assert set(cut_batch['trunk']) == set(trunk.cut)
  out, _ = forward(prep.model.apply, variables['params'], variables['batch_stats'],
                   model_inputs(cut_batch), train=False)
  want, _ = forward(prep.model.apply, variables['params'], variables['batch_stats'],
                    model_inputs(plain), train=False)
  for field in ('z_img', 'z_txt', 'z_joint', 'logits_img', 'logits_txt', 'logits_joint'):
    np.testing.assert_allclose(np.asarray(getattr(out, field)),
                               np.asarray(getattr(want, field)), rtol=1e-5, atol=1e-5)
  # the substitution is real: another trunk output changes the result
  bumped = dict(model_inputs(cut_batch), trunk={p: v + 1.0 for p, v in cut_batch['trunk'].items()})
  other, _ = forward(prep.model.apply, variables['params'], variables['batch_stats'], bumped,
                     train=False)
  assert np.max(np.abs(np.asarray(other.z_joint) - np.asarray(want.z_joint))) > 1e-3


def test_trunk_source_cuts_text_to_the_batch(prep):
  variables = prep.init_variables(0)
  rows = np.asarray(prep.split.retain_idx[:5])
  trunk = _trunk(prep, variables, 1, 0, rows=rows)
  source = trunk_lib.TrunkSource(prep.source, trunk)
  batch = source.get_batch(rows, pad_to=8, text_len=16)
  text = next(p for p in trunk.cut if p.startswith('text_encoder'))
  image = next(p for p in trunk.cut if p.startswith('image_encoder'))
  assert batch['trunk'][text].shape[:2] == (8, 16)
  assert trunk.outputs[text].shape[0] == len(rows)  # only the images asked for are stored
  np.testing.assert_array_equal(batch['trunk'][text][:5], trunk.outputs[text][:, :16])
  np.testing.assert_array_equal(batch['trunk'][image][5:], trunk.outputs[image][[0] * 3])
  assert len(source) == len(prep.source) and source.max_len == prep.source.max_len
  other = np.setdiff1d(np.arange(len(prep.source)), rows)[:2]
  with pytest.raises(ValueError, match='no cached outputs for images'):
    source.get_batch(other)


def test_run_trains_only_the_top(prep, tmp_path):
  """Push and repair with a trunk: every trunk leaf (params and BatchNorm statistics) stays
  the original's bit for bit, the top moves, and the run's seconds include the trunk's."""
  config = copy.deepcopy(prep.config)
  config.forgetmi.trunk.k_image, config.forgetmi.trunk.k_text = 1, 0
  p = setup.Prepared(**{**prep.__dict__, 'config': config})
  original = prep.init_variables(0)
  result = setup.run_method(p, original, 'forgetmi', ckpt_root=str(tmp_path), stopping=None)
  assert [h.get('phase') for h in result.histories[0]] == [None, None, 'repair']
  final = result.states[0].variables
  image = encoder_blocks(original['params'], 'image_encoder')
  moved = {}
  for tree in ('params', 'batch_stats'):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(original[tree]),
                            jax.tree_util.tree_leaves(final[tree])):
      names = path_names(path)
      moved['/'.join(names)] = bool(np.any(np.asarray(a) != np.asarray(b)))
  frozen = [n for n in moved if n.startswith(('image_encoder/stem', 'text_encoder/embeddings'))
            or any(n.startswith(f'image_encoder/{b}/') for b in image[:-1])]
  assert frozen and not any(moved[n] for n in frozen)
  assert moved and any(moved[n] for n in moved if n.startswith(f'image_encoder/{image[-1]}/'))
  assert any(moved[n] for n in moved if n.startswith('image_head/'))  # the repair trains heads
  trunk = setup.frozen_trunk(p, original, 'forgetmi', setup.copies_of(config, 'forgetmi'))
  assert trunk.cut == trunk_lib.cut_modules(original['params'], 1, 0)
  assert result.seconds > trunk.seconds > 0
