"""The latent conventions of the published pipelines: what a diffusion model sees."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._config import AutoencoderKLConfig


def scale_latents(
    config: AutoencoderKLConfig, z: Float[Array, "*batch c h w"]
) -> Float[Array, "*batch c h w"]:
    """`z` normalised by `config`'s convention (see `AutoencoderKL.scale_latents`)."""
    if config.latents_mean is not None and config.latents_std is not None:
        mean, std = _broadcast_stats(z, config.latents_mean, config.latents_std)
        return (z - mean) * config.scaling_factor / std
    if config.shift_factor is not None:
        return (z - config.shift_factor) * config.scaling_factor
    return z * config.scaling_factor


def unscale_latents(
    config: AutoencoderKLConfig, z: Float[Array, "*batch c h w"]
) -> Float[Array, "*batch c h w"]:
    """The inverse of `scale_latents`."""
    if config.latents_mean is not None and config.latents_std is not None:
        mean, std = _broadcast_stats(z, config.latents_mean, config.latents_std)
        return z * std / config.scaling_factor + mean
    if config.shift_factor is not None:
        return z / config.scaling_factor + config.shift_factor
    return z / config.scaling_factor


def _broadcast_stats(
    z: Array, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Array, Array]:
    """Per-channel latent statistics shaped to broadcast against `(*batch, C, H, W)`."""
    shape = (1,) * (z.ndim - 3) + (len(mean), 1, 1)
    return (
        jnp.asarray(np.reshape(mean, shape), z.dtype),
        jnp.asarray(np.reshape(std, shape), z.dtype),
    )
