"""The loop's input, end to end: a device-resident cohort gives the host pipeline's run bit for
bit, and text cut to length buckets trains like the padded text (dropout off, so both runs draw
nothing at random that depends on the length)."""
import jax
import numpy as np
import pytest

from forgetmi_jax.data.device_data import DeviceSource
from forgetmi_jax.data.trim import buckets_for
from forgetmi_jax.runs import setup as run_setup
from forgetmi_jax.train import loop
from forgetmi_jax.unlearning.forgetmi import ForgetMIMethod
from tests.helpers import tiny_config

MAX_LEN = 160  # the tiny cohort's reports have 42-119 tokens: 'multiple' cuts to 112-128


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp('placement'), **{
      'train.epochs': 1, 'forgetmi.epochs': 1, 'data.max_text_len': MAX_LEN,
      'model.text.max_position_embeddings': MAX_LEN, 'model.text_buckets': 'multiple',
      'model.text.hidden_dropout_prob': 0.0, 'model.fusion.dropout_rate': 0.0,
      # character noise makes the noisy reports' tokens run to max_text_len: none here, so
      # that the steps really are cut (the noisy draws' cut is tested in test_device_data)
      'forgetmi.noise.text_mode': 'none'})
  return run_setup.prepare(config)


def _leaves(states):
  return [np.asarray(x) for s in states for x in jax.tree.leaves(s.params)]


def _l2(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in zip(a, b))))


def _forgetmi(prep, source, buckets, tmp_path, name):
  ctx = run_setup.make_context(prep)
  ctx.source, ctx.text_buckets = source, buckets
  copies = [loop.Copy(s, prep.config.forgetmi) for s in (0, 1)]  # two seeds: stacked batches
  return loop.run(ForgetMIMethod(ctx, copies), prep.init_variables(0), str(tmp_path / name))


def test_buckets_really_cut_the_text(prep):
  buckets = buckets_for('multiple', MAX_LEN)
  assert buckets == tuple(range(16, 161, 16))
  method = ForgetMIMethod(run_setup.make_context(prep), [loop.Copy(0, prep.config.forgetmi)])
  widths = {b['forget']['input_ids'].shape[-1] for b in method.seed_batches(0, 0)}
  assert max(widths) < MAX_LEN, widths


def test_device_resident_run_equals_host_run(prep, tmp_path):
  buckets = prep.text_buckets
  dev = DeviceSource.from_source(prep.source, dtype='float32')
  host = _forgetmi(prep, prep.source, buckets, tmp_path, 'host')
  device = _forgetmi(prep, dev, buckets, tmp_path, 'device')
  for a, b in zip(_leaves(host.states), _leaves(device.states)):
    np.testing.assert_array_equal(a, b)
  def losses(result):  # per copy and epoch, all but the throughput
    return [[{k: v for k, v in e.items() if k != 'examples_per_s'} for e in h]
            for h in result.histories]
  assert losses(host) == losses(device)


def test_trimmed_text_trains_like_padded_text(prep, tmp_path):
  """Forget-MI, two seeds stacked at different lengths: the cut run ends where the padded one
  does, to float rounding (L2 within 1e-3 of how far they moved; a copy fed other batches
  lands 20-100 % away, test_loop). Training reads the same pipeline (`TrainMethod`)."""
  start = prep.init_variables(0)
  cut = _forgetmi(prep, prep.source, prep.text_buckets, tmp_path, 'cut')
  padded = _forgetmi(prep, prep.source, None, tmp_path, 'padded')
  moved = _l2(_leaves(padded.states), [np.asarray(x) for x in jax.tree.leaves(start['params'])] * 2)
  assert moved > 1e-2
  assert _l2(_leaves(cut.states), _leaves(padded.states)) <= 1e-3 * moved

