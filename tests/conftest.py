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
# Full float32 matrix products, as PyTorch computes them on the CPU. JAX's default on
# NVIDIA GPUs rounds float32 operands to TF32: measured on an H200 with jax 0.11.2, the
# float32 parity cases then differ from PyTorch by up to 4e-4, far beyond float32 rounding
# (1e-5); with "highest" every one of them passes. On CPUs this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
