import jax


# Eight CPU devices for the sharding tests; set before any computation runs.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402


# Tests build the same programs many times over (a train step per test, the same
# model's decode in several modules): XLA's persistent compilation cache, private to the
# session, compiles each once. The command-line tests' subprocesses share it.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="eqx_vae_test_jax_cache_")
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE

import gc  # noqa: E402
import itertools  # noqa: E402

import jaxtyping  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def getkey():
    """Returns a function that gives a fresh PRNG key on every call."""
    counter = itertools.count()
    base = jax.random.key(5678)
    return lambda: jax.random.fold_in(base, next(counter))


@pytest.fixture
def without_typechecks():
    """Turns the runtime jaxtyping checks off for one test, to see the errors a user
    without them gets."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def pytest_collection_modifyitems(items):
    """The live comparisons with diffusers' PyTorch and Flax implementations import
    torch or flax (many seconds) and run them: they belong to the slow tests."""
    for item in items:
        if any(item.get_closest_marker(name) is not None for name in ("torch", "flax")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Each test module compiles programs of its own: drop them after the module, so that
    the suite's memory stays that of its largest module rather than of all of them."""
    yield
    jax.clear_caches()
    gc.collect()
