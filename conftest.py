"""Settings for the whole test run (``tests/`` and ``parity/``), made to cut compile time.

Most tests are compile-bound: they build small programs, run them once and compare. Two settings,
set in the environment before pytest-xdist starts its workers (they, and the tests' subprocesses,
inherit it):

* **One compilation cache per run.** Many tests (and subprocesses: the multi-device and command-line
  tests) compile a program another has compiled already. JAX's persistent compilation cache, in a
  fresh directory for each run and removed after it, lets them reuse the executable; it is keyed by
  the whole program, the compile options and the backend, so a hit runs exactly what a compile would
  have produced. A ``JAX_COMPILATION_CACHE_DIR`` set by the user is kept.
* **LLVM at -O0 for XLA:CPU's generated loops** (``--xla_backend_optimization_level=0``). It leaves the
  optimised HLO program alone (what the program tests read: collectives, YNNPACK's convs, buffer
  sizes) and the library calls that do the convs and matmuls; it only skips LLVM's optimisation of
  the fused elementwise and reduction loops, which keeps IEEE semantics at every level (XLA:CPU sets no
  fast-math flags), so values stay within the same rounding that the tolerances allow across CPUs.
  Measured: 43% less time for ``test_channels_first_is_the_pytorch_layout``'s 80 compile-bound cases,
  10% more for the 200-step training run. An ``--xla_backend_optimization_level`` in ``XLA_FLAGS`` is kept.

And one ordering: **the longest tests first** (:func:`pytest_collection_modifyitems`). pytest-xdist hands
tests to its workers in collection order, which put the minute-long subprocess and training tests
(``tests/trainer``, ``tests/spmd``) last, where one worker ran them alone while the other had finished.
Started first, they overlap the rest of the suite.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_SETTINGS = {
    # Cache every compilation, not only those over JAX's default 1 s: the suite's programs are small.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_LLVM_LEVEL_FLAG = "--xla_backend_optimization_level"


def pytest_configure(config: pytest.Config) -> None:
    """In the controller (or a run without workers); the run's own cache directory goes when it ends."""
    if hasattr(config, "workerinput"):  # an xdist worker: its environment came from the controller
        return
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if _LLVM_LEVEL_FLAG not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} {_LLVM_LEVEL_FLAG}=0".strip()
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    cache_dir = tempfile.mkdtemp(prefix="jdynconv-jax-cache-")
    config.add_cleanup(lambda: shutil.rmtree(cache_dir, ignore_errors=True))
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": cache_dir, **_CACHE_SETTINGS})
    import jax  # for a run without workers: jax has read its environment already (not XLA_FLAGS, read at first use)

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


LONGEST_FIRST = ("tests/trainer/test_sharding.py", "tests/spmd/", "tests/trainer/test_train_cli.py", "tests/trainer/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Moves the longest tests (subprocesses with forced devices, training runs) to the front, stably."""

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)
