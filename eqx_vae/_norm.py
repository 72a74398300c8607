import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._custom_types import DTypeLike


# diffusers and CompVis use this epsilon in every GroupNorm of the autoencoder.
GROUP_NORM_EPS = 1e-6


def make_group_norm(
    channels: int, groups: int, *, dtype: DTypeLike | None, where: str
) -> eqx.nn.GroupNorm:
    """An affine `eqx.nn.GroupNorm` with the autoencoder's epsilon.

    `where` names the layer in the error raised when `groups` does not divide
    `channels`.
    """
    if channels % groups != 0:
        raise ValueError(
            f"`norm_num_groups={groups}` does not divide the {channels} channels of {where}; "
            "choose a number of groups that divides every channel count."
        )
    return eqx.nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, dtype=dtype)


def group_norm_hwc(
    norm: eqx.nn.GroupNorm, x: Float[Array, "h w c"], *, silu: bool = False
) -> Float[Array, "h w c"]:
    """GroupNorm (optionally followed by SiLU) of a channels-last image.

    Statistics, the affine transform and the activation are computed in float32
    whatever the input dtype, and the result is cast back: half-precision sums over
    millions of pixels would otherwise lose the mean.
    """
    h, w, c = x.shape
    groups = norm.groups
    xf = x.astype(jnp.float32).reshape(h, w, groups, c // groups)
    mean = jnp.mean(xf, axis=(0, 1, 3), keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=(0, 1, 3), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + norm.eps)).reshape(h, w, c)
    if norm.weight is not None:
        y = y * norm.weight.astype(jnp.float32).reshape(1, 1, c)
    if norm.bias is not None:
        y = y + norm.bias.astype(jnp.float32).reshape(1, 1, c)
    if silu:
        y = jax.nn.silu(y)
    return y.astype(x.dtype)
