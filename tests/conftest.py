"""One persistent XLA compilation cache for every CLI subprocess of a test session.

Many end-to-end tests run the same smoke programs (configs/train.py:smoke alone runs in eight subprocesses);
with the cache only the first compiles them (a train smoke run takes ~20 s instead of ~50 s here). The
directory is made by the controlling process, inherited by pytest-xdist workers through the environment, and
removed at the end of the session. The cache key covers the program, jax version and flags, so a hit runs the
same executable a compilation would have produced.
"""

import os
import shutil
import tempfile

CACHE_VARIABLE = "CALIBJAX_TEST_XLA_CACHE"


def pytest_configure(config):
  if CACHE_VARIABLE not in os.environ:
    os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="calibjax-xla-cache-")
    config._calibjax_owns_cache = True


def pytest_unconfigure(config):
  if getattr(config, "_calibjax_owns_cache", False):
    shutil.rmtree(os.environ.pop(CACHE_VARIABLE), ignore_errors=True)
