"""The latent conventions of the published pipelines: what a diffusion model sees."""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._batch_norm import LatentBatchNorm
from ._config import AutoencoderKLConfig


def scale_latents(
    config: AutoencoderKLConfig, bn: LatentBatchNorm | None, z: Float[Array, "*batch c h w"]
) -> Float[Array, "*batch c2 h2 w2"]:
    """`z` normalised by `config`'s convention, or for FLUX.2 patchified and normalised
    by the statistics `bn` (see `AutoencoderKL.scale_latents`)."""
    if config.patch_size is not None:
        if bn is None:
            raise ValueError("A config with a `patch_size` needs the model's BatchNorm `bn`.")
        _check_channels(z, "scale_latents", config.latent_channels, "raw latent")
        return bn(patchify(z, config.patch_size))
    if config.latents_mean is not None and config.latents_std is not None:
        mean, std = _broadcast_stats(z, config.latents_mean, config.latents_std)
        return (z - mean) * config.scaling_factor / std
    if config.shift_factor is not None:
        return (z - config.shift_factor) * config.scaling_factor
    return z * config.scaling_factor


def unscale_latents(
    config: AutoencoderKLConfig, bn: LatentBatchNorm | None, z: Float[Array, "*batch c2 h2 w2"]
) -> Float[Array, "*batch c h w"]:
    """The inverse of `scale_latents`."""
    if config.patch_size is not None:
        if bn is None:
            raise ValueError("A config with a `patch_size` needs the model's BatchNorm `bn`.")
        ph, pw = config.patch_size
        what = f"scaled latent: {config.latent_channels} channels in {ph}x{pw} patches"
        _check_channels(z, "unscale_latents", config.scaled_latent_channels, what)
        return unpatchify(bn.inverse(z), config.patch_size)
    if config.latents_mean is not None and config.latents_std is not None:
        mean, std = _broadcast_stats(z, config.latents_mean, config.latents_std)
        return z * std / config.scaling_factor + mean
    if config.shift_factor is not None:
        return z / config.scaling_factor + config.shift_factor
    return z / config.scaling_factor


def describe_convention(config: AutoencoderKLConfig) -> str:
    """What `scale_latents` does under `config`, in one line."""
    if config.patch_size is not None:
        ph, pw = config.patch_size
        return (
            f"{ph}x{pw} patches folded into the channels, then "
            f"(z - bn.running_mean) / sqrt(bn.running_var + {config.batch_norm_eps})"
        )
    if config.latents_mean is not None:
        return "(z - latents_mean) * scaling_factor / latents_std"
    if config.shift_factor is not None:
        return f"(z - {config.shift_factor}) * {config.scaling_factor}"
    return f"z * {config.scaling_factor}"


def patchify(
    z: Float[Array, "*batch c h w"], patch: tuple[int, int]
) -> Float[Array, "*batch c2 h2 w2"]:
    """Folds each `(ph, pw)` patch of pixels into the channels: `(C, H, W)` becomes
    `(C * ph * pw, H / ph, W / pw)`, channel `(c * ph + dy) * pw + dx` holding pixel
    `(dy, dx)` of channel `c`'s patches, as FLUX.2's pipelines order them."""
    ph, pw = patch
    *batch, c, h, w = z.shape
    if h % ph or w % pw:
        raise ValueError(
            f"FLUX.2's latent folds {ph}x{pw} patches into its channels, so the latent's "
            f"height and width must be multiples of {ph} and {pw}, got {h}x{w}; pad the "
            "image to a multiple of the spatial factor times the patch size before "
            "encoding."
        )
    n = len(batch)
    z = z.reshape(*batch, c, h // ph, ph, w // pw, pw)
    axes = (*range(n), n, n + 2, n + 4, n + 1, n + 3)
    return z.transpose(axes).reshape(*batch, c * ph * pw, h // ph, w // pw)


def unpatchify(
    z: Float[Array, "*batch c2 h2 w2"], patch: tuple[int, int]
) -> Float[Array, "*batch c h w"]:
    """The inverse of `patchify`: `(C * ph * pw, H, W)` to `(C, H * ph, W * pw)`."""
    ph, pw = patch
    *batch, channels, h, w = z.shape
    if channels % (ph * pw):
        raise ValueError(
            f"A patchified latent has a multiple of {ph * pw} channels (a {ph}x{pw} patch "
            f"per latent channel), got {channels}."
        )
    n = len(batch)
    c = channels // (ph * pw)
    z = z.reshape(*batch, c, ph, pw, h, w)
    axes = (*range(n), n, n + 3, n + 1, n + 4, n + 2)
    return z.transpose(axes).reshape(*batch, c, h * ph, w * pw)


def _check_channels(z: Array, method: str, channels: int, what: str) -> None:
    if z.ndim < 3 or z.shape[-3] != channels:
        raise ValueError(
            f"`{method}` expects latents of shape (..., {channels}, h, w) (the {what}), "
            f"got shape {tuple(z.shape)}."
        )


def _broadcast_stats(
    z: Array, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Array, Array]:
    """Per-channel latent statistics shaped to broadcast against `(*batch, C, H, W)`."""
    shape = (1,) * (z.ndim - 3) + (len(mean), 1, 1)
    return (
        jnp.asarray(np.reshape(mean, shape), z.dtype),
        jnp.asarray(np.reshape(std, shape), z.dtype),
    )
