"""Small configurations for the comparisons with diffusers' `FlaxAutoencoderKL`, the
random parameters used for them, and the Flax reference computation.

diffusers' Flax model always has both quant convs and mid-block attention, so the cases
vary what it can vary: levels, layers per block, channel counts, non-square images.
Shared by the live tests and by `make_flax_fixtures.py`, which stores the reference
outputs so that they are also checked where flax is not installed.
"""

import dataclasses
import importlib
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    image_shape: tuple[int, int, int]


def _config(levels: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": 16,
        **kwargs,
    }


CASES = (
    Case(
        "one_level_grey",
        _config(
            1,
            in_channels=1,
            out_channels=1,
            block_out_channels=[8],
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=3,
        ),
        (1, 10, 6),
    ),
    Case(
        "two_levels_lpb2",
        _config(
            2,
            in_channels=4,
            out_channels=2,
            block_out_channels=[4, 8],
            layers_per_block=2,
            norm_num_groups=4,
            latent_channels=8,
        ),
        (4, 12, 20),
    ),
    Case(
        "three_levels_sdxl_scaling",
        _config(
            3,
            block_out_channels=[4, 8, 8],
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            scaling_factor=0.13025,
        ),
        (3, 16, 24),
    ),
)


def flax_model(config: dict[str, Any]):
    """diffusers' `FlaxAutoencoderKL` for a config (lists as tuples, as Flax modules
    need hashable fields)."""
    diffusers = importlib.import_module("diffusers")  # 0.39 or older
    return diffusers.FlaxAutoencoderKL(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    )


def random_params(model, seed: int) -> dict[str, Any]:
    """`init_weights` parameters with random biases and GroupNorm scales (it makes them
    zeros and ones, under which a misplaced bias or scale would go unnoticed), rounded
    to float16 values (so that fixtures can store them in half the space) and returned
    as float32 NumPy arrays in nested plain dicts."""
    import jax

    rng = np.random.default_rng(seed)
    initial = model.init_weights(jax.random.PRNGKey(seed))

    def draw(path, leaf):
        leaf = np.asarray(leaf)
        if path[-1].key == "bias":
            leaf = 0.1 * rng.standard_normal(leaf.shape)
        elif path[-1].key == "scale":
            leaf = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        return leaf.astype(np.float16).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, initial)
    return _plain(params)


def _plain(tree) -> dict[str, Any]:
    return {k: _plain(v) if hasattr(v, "items") else v for k, v in tree.items()}


def inputs(case: Case, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image `(C, H, W)` in [-1, 1] and a latent `(C, h, w)` for `case`."""
    rng = np.random.default_rng(seed + 1)
    image = rng.uniform(-1.0, 1.0, size=case.image_shape).astype(np.float32)
    factor = 2 ** (len(case.config["block_out_channels"]) - 1)
    latent_shape = (
        case.config["latent_channels"],
        case.image_shape[1] // factor,
        case.image_shape[2] // factor,
    )
    return image, rng.standard_normal(latent_shape).astype(np.float32)


def flax_outputs(model, params, image: np.ndarray, latent: np.ndarray) -> dict[str, np.ndarray]:
    """The Flax model's posterior mean and log-variance for `image` and its decode of
    `latent`, all unbatched and channels-first like eqx_vae's. The latent goes in
    channels-last: `FlaxAutoencoderKL.decode` transposes a channels-first latent only
    when its width differs from the channel count."""
    variables = {"params": params}
    posterior = model.apply(variables, image[None], method=model.encode).latent_dist
    decoded = model.apply(variables, latent.transpose(1, 2, 0)[None], method=model.decode)
    return {
        "mean": np.asarray(posterior.mean)[0].transpose(2, 0, 1),
        "logvar": np.asarray(posterior.logvar)[0].transpose(2, 0, 1),
        "decoded": np.asarray(decoded.sample)[0],
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by `/`-joined paths."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *modules, name = path.split("/")
        node = out
        for module in modules:
            node = node.setdefault(module, {})
        node[name] = value
    return out
