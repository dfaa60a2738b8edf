"""JAX configuration for the whole suite: float64 on, no silent promotions.

No persistent compilation cache: with one (shared by the workers, or one per worker)
runs of the suite lost a worker to a segmentation fault inside jaxlib while it wrote an
executable to the cache (``compilation_cache.put_executable_and_time``); each process
compiles what it runs.

XLA compiles the suite's programs with LLVM's optimizations off: the suite compiles
hundreds of small programs and runs each a few times, so optimizing their machine code
costs more than it saves (measured: tests/test_train.py 216 s -> 163 s on a 2-core
CPU). With jaxlib 0.10, whose CPU compiler has both, fused loops are also emitted the
older way, which compiles faster (the tbptt parity checks: 23.7 s -> 14.6 s); a newer
jaxlib may not know that flag, and XLA stops on a flag it does not know, so it is set
for 0.10 only. The flags change how fast the code runs, not what it computes (no
fast-math): every tolerance stays as it was. Flags already in ``XLA_FLAGS`` are kept,
and setting ``LOOPGRAD_TEST_OPTIMIZE=1`` compiles as users do.
"""

import importlib.metadata
import os

import pytest

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
if os.environ.get("LOOPGRAD_TEST_OPTIMIZE") != "1" and _FAST_COMPILE not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402 - after XLA_FLAGS, which the backend reads when it starts

# Virtual CPU devices for the data-parallel tests: tests/test_parallel.py runs itself in a
# process of its own with LOOPGRAD_TEST_DEVICES=4. Not here: XLA starts a thread per CPU
# device, and four threads on two cores slowed the whole suite by a third.
if os.environ.get("LOOPGRAD_TEST_DEVICES"):
    jax.config.update("jax_num_cpu_devices", int(os.environ["LOOPGRAD_TEST_DEVICES"]))
jax.config.update("jax_enable_x64", True)
# Full float32 matrix products, as PyTorch computes them on the CPU. JAX's default on
# NVIDIA GPUs rounds float32 operands to TF32: measured on an H200 with jax 0.11.2, the
# float32 parity cases then differ from PyTorch by up to 4e-4, far beyond float32 rounding
# (1e-5); with "highest" every one of them passes. On CPUs this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# The test tiers. The README's test command runs the quick tier; `pytest --full` also runs
# the tests marked `slow` (the full grids: every case of a parametrised grid the quick tier
# samples), and `pytest --full -m slow` runs those alone, as .ci/run does after the quick
# tier. Beside the cases marked slow by hand, every parametrised test with at least 2
# quick cases keeps every second one (every third from 4 on, every fifth from 8 on), in
# collection order, which varies every parameter, in the quick tier and moves the rest to
# the slow tier, marked as such, so that `-m slow` selects them. CI runs both tiers, so
# every case runs there; sampled this way the quick tier (the README's command) stays
# under 5 minutes on 2 cores, install included.
def _quick_stride(cases: int) -> int:
    return 1 if cases < 2 else 2 if cases < 4 else 3 if cases < 8 else 5


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the tests marked slow (the full grids); the quick tier skips them",
    )


@pytest.hookimpl(tryfirst=True)  # before -m reads the markers
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        if "slow" not in item.keywords and getattr(item, "callspec", None) is not None:
            groups.setdefault((item.module.__name__, item.originalname), []).append(item)
    for group in groups.values():
        stride = _quick_stride(len(group))
        for index, item in enumerate(group):
            if index % stride:
                item.add_marker(pytest.mark.slow)
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
