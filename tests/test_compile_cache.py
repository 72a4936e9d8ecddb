"""The compile cache (`config.compile_cache_dir`, runs/setup.use_compile_cache): where it goes
and that it is taken once per process (that its programs hold no image: tests/test_repair.py,
beside a run that compiles them)."""
import os
import stat
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_fresh(code, tmp_path, min_compile_secs='0'):
  """`code` in a new python process without the suite's cache directory (jax's setting is
  process-wide and fixed at the first compilation); `min_compile_secs` None: the variable
  unset, as in a user's shell."""
  env = {k: v for k, v in os.environ.items() if k not in (
      'JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES')}
  if min_compile_secs is not None:
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = min_compile_secs
  env['PYTHONPATH'] = ROOT
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_default_is_an_owner_only_folder_in_the_cache_dir_taken_once(tmp_path):
  cache = str(tmp_path / 'cache')
  out = _run_fresh(f"""
      import os, jax, jax.numpy as jnp
      from forgetmi_jax.runs.setup import use_compile_cache
      print(use_compile_cache('none', {cache!r}), jax.config.jax_compilation_cache_dir,
            os.path.exists({cache!r}))
      first = use_compile_cache('', {cache!r})
      print(first)
      print(use_compile_cache({str(tmp_path / 'other')!r}, {cache!r}))
      jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
      print(sorted(f for f in os.listdir(first) if f.endswith('-cache')))
      """, tmp_path)
  off, first, second, entries = out.strip().splitlines()[-4:]
  assert off == 'None None False'  # 'none': no cache, nothing made
  assert first == os.path.join(cache, 'xla')
  assert second == first  # a process keeps its first directory
  assert not (tmp_path / 'other').exists()
  assert 'jit__lambda' in entries  # the program was written there
  assert stat.S_IMODE(os.stat(first).st_mode) == 0o700


def test_small_programs_are_kept_unless_the_user_says_otherwise(tmp_path):
  """A run's small programs (a few ms to compile) are written too, not only those past jax's
  default second; JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, wins."""
  code = f"""
      import os, jax, jax.numpy as jnp
      from forgetmi_jax.runs.setup import use_compile_cache
      path = use_compile_cache('', {str(tmp_path / 'c')!r})
      jax.jit(lambda x: x * 3 + 1)(jnp.ones(4)).block_until_ready()
      print(jax.config.jax_persistent_cache_min_compile_time_secs,
            sum(f.endswith('-cache') for f in os.listdir(path)))
      """
  kept = _run_fresh(code, tmp_path, min_compile_secs=None).strip().splitlines()[-1].split()
  assert float(kept[0]) == 0 and int(kept[1]) >= 1
  (tmp_path / 'c').rename(tmp_path / 'first')
  theirs = _run_fresh(code, tmp_path, min_compile_secs='100').strip().splitlines()[-1].split()
  assert float(theirs[0]) == 100 and int(theirs[1]) == 0
