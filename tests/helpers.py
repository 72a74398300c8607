import json
import os
import pathlib
from typing import Any

import numpy as np
import pytest

import eqx_vae


FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# The parity tolerance: max |ours - diffusers| <= RTOL * max |diffusers|, float32.
RTOL = 1e-4


def small_config(**overrides) -> eqx_vae.AutoencoderKLConfig:
    """A two-level model small enough for fast tests."""
    levels = len(overrides.get("block_out_channels", (16, 32)))
    base: dict[str, Any] = dict(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
    )
    base.update(overrides)
    return eqx_vae.AutoencoderKLConfig(**base)


def assert_close(actual, expected, rtol: float = RTOL, what: str = "") -> float:
    """Asserts `max|actual - expected| <= rtol * max|expected|`; returns the ratio."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    ratio = float(np.max(np.abs(actual - expected))) / scale
    assert ratio <= rtol, f"{what}: max|diff| / max|ref| = {ratio:.3g} > {rtol:g}"
    return ratio


def load_fixture(path: pathlib.Path) -> tuple[eqx_vae.AutoencoderKLConfig, dict, dict]:
    """A parity fixture: the config, the diffusers state dict and the other arrays."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    config = eqx_vae.AutoencoderKLConfig.from_dict(json.loads(str(arrays.pop("config"))))
    return (
        config,
        parameters_of(arrays),
        {k: v for k, v in arrays.items() if not k.startswith("param/")},
    )


def parameters_of(arrays: dict) -> dict[str, np.ndarray]:
    """The `param/` arrays of a reference as a diffusers state dict: floating ones in
    float32, integer ones (a BatchNorm's batch count) as they are."""
    return {
        k.removeprefix("param/"): v if np.issubdtype(v.dtype, np.integer) else v.astype(np.float32)
        for k, v in arrays.items()
        if k.startswith("param/")
    }


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


def require_flax():
    """Imports flax and diffusers' `FlaxAutoencoderKL` for a live comparison, or skips:
    diffusers removed its Flax models after 0.39, so they are not part of the test
    requirements (the `bench` extra has them)."""
    pytest.importorskip("flax")
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "FlaxAutoencoderKL"):
        pytest.skip(f"diffusers {diffusers.__version__} has no FlaxAutoencoderKL (0.39 has)")
    return diffusers.FlaxAutoencoderKL
