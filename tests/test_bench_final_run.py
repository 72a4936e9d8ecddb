"""benchmarks/bench_final_run.py's Timeline: how a run's seconds are split into parts."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))

from bench_final_run import STEPS, Timeline  # noqa: E402


def test_parts_and_compile_spans_hand_worked():
  t = Timeline()
  t.timed = [(0.0, 100.0)]
  t.windows = [(0.0, 10.0, 'checkpoints'), (2.0, 4.0, 'targets'),  # nested: counts as outer
               (20.0, 30.0, 'targets')]
  t.compiles = [(1.0, 3.0), (2.5, 3.5),  # overlap: one span 1-3.5, inside the checkpoints
                (21.0, 22.0),  # the targets' own
                (40.0, 41.0), (40.2, 40.5),  # a jit traced inside another: counted once
                (150.0, 160.0)]  # outside the timed run: not counted
  wall, compiled = t.seconds()
  assert wall == {'checkpoints': 10.0, 'targets': 10.0}
  assert compiled == pytest.approx({'checkpoints': 2.5, 'targets': 1.0, STEPS: 1.0})


def test_wrap_times_calls_and_the_run():
  class Owner:
    @staticmethod
    def work(x):
      return x + 1

    @staticmethod
    def run():
      return 'ran'

  clock = iter([0.0, 5.0, 1.0, 2.0])
  t = Timeline(clock=lambda: next(clock))
  t.wrap(Owner, 'run')
  t.wrap(Owner, 'work', 'part')
  assert Owner.run() == 'ran' and Owner.work(1) == 2  # the wrapped calls return as before
  assert t.timed == [(0.0, 5.0)] and t.windows == [(1.0, 2.0, 'part')]
  t.on_span('/jax/core/compile/jaxpr_trace_duration', 3.0, 4.0, fun_name='step')
  t.on_span('/jax/some/other_event', 3.0, 4.0)
  assert t.compiles == [(3.0, 4.0)]
  assert t.seconds() == ({'part': 1.0}, {STEPS: 1.0})
