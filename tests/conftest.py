import os
import pathlib

import jax


# Eight CPU devices for the sharding tests; set before any computation runs.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import itertools  # noqa: E402

import jaxtyping  # noqa: E402
import pytest  # noqa: E402


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


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


def require_torch():
    """Imports torch and diffusers for a live comparison. They are part of the test
    requirements in CI, so there a missing install fails instead of skipping."""
    try:
        import diffusers
        import torch
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("torch and diffusers are not installed (pip install -e '.[parity]')")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch, diffusers


def require(module: str):
    """Imports an optional test requirement; like `require_torch`, a missing install
    fails in CI instead of skipping."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[parity]')")
