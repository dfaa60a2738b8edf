"""JAX configuration for the whole suite: float64 on, no silent promotions.

The pytest-xdist workers share one persistent compilation cache for the session, so
an executable that two workers need (most eager-mode primitives at the fixtures'
sizes) is compiled once. The cache lives in a fresh temporary folder, removed at the
end: nothing carries over between runs.
"""

import os
import shutil
import tempfile

import jax

_CACHE_ENV = "LOOPGRAD_TEST_JAX_CACHE"


def pytest_configure(config):
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        # The controlling process: workers start after this and inherit the variable.
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="loopgrad-jax-cache-")
        config._loopgrad_cache_owner = True
    if _CACHE_ENV in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "_loopgrad_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
