import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One persistent XLA cache for every program the suite compiles, small ones included, shared by
# the subprocesses the tests launch: the tests build the same tiny models and steps again and
# again, and XLA:CPU compilation is most of the suite's time (measured on test_unlearn_step,
# test_loop and test_stopping from a cold cache: 810 -> 431 CPU seconds). Set before jax is
# imported (jax reads these at import); the cache key covers the program, flags and versions.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'forgetmi_jax_tests_xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# LLVM optimisation level 1: compiling is much of the suite's cost, but level 0's code runs
# the end-to-end tests' forwards slower. Measured cold on 2 cores, a comparison running
# beside (so slower than alone): the smoke comparison (test_compare's fixture) 175 s at
# level 0, 138 s at the default, 104 s at 1;
# test_loop + test_unlearn_step + test_stopping + test_repair 218 s at 0, 182 s at 1.
# test_parallel's workers keep 0 (47 s against 53 s at 1). It changes how fast the code runs,
# not what it computes; both sides of every comparison are compiled the same way.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=1').strip()
