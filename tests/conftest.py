import jax


# Eight CPU devices for the sharding tests; set before any computation runs.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

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
    """The live comparisons with diffusers' PyTorch implementation import torch (many
    seconds) and run it: they belong to the slow tests."""
    for item in items:
        if item.get_closest_marker("torch") is not None:
            item.add_marker(pytest.mark.slow)
