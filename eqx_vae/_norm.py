"""GroupNorm on channels-last activations, with its statistics from the input, from
the shards of a split image, or from `Policy.norm_stats`."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._custom_types import DTypeLike, Observed
from ._precision import at_least_float32
from ._scope import Scope


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


def group_moments(
    x: Float[Array, "h w g cg"], axis_name: str | None
) -> tuple[Float[Array, " g"], Float[Array, " g"]]:
    """Mean and (biased) variance of each group, over the whole image: reduced over
    the shards of `axis_name` when the height is sharded. Two passes (mean, then the
    mean square deviation), as a sum of squares minus the squared mean loses the
    variance of activations with a large mean."""
    count = jnp.asarray(x.shape[0] * x.shape[1] * x.shape[3], x.dtype)
    total = jnp.sum(x, axis=(0, 1, 3))
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
        total = jax.lax.psum(total, axis_name)
    mean = total / count
    squares = jnp.sum(jnp.square(x - mean.reshape(1, 1, -1, 1)), axis=(0, 1, 3))
    if axis_name is not None:
        squares = jax.lax.psum(squares, axis_name)
    return mean, squares / count


def owned_moments(
    x: Float[Array, "h w g cg"], owned: Float[Array, "2 2"]
) -> tuple[Float[Array, ""], Float[Array, " g"], Float[Array, " g"]]:
    """Count, mean and sum of squared deviations of each group over the owned part of a
    tile (`owned`: its rows' and columns' bounds as fractions of the tile)."""
    h, w = x.shape[:2]
    rows = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    cols = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    in_rows = (rows >= owned[0, 0]) & (rows < owned[0, 1])
    in_cols = (cols >= owned[1, 0]) & (cols < owned[1, 1])
    mask = (in_rows[:, None] & in_cols[None, :]).astype(x.dtype)[:, :, None, None]
    count = jnp.sum(mask) * x.shape[3]
    mean = jnp.sum(x * mask, axis=(0, 1, 3)) / count
    deviations = (x - mean.reshape(1, 1, -1, 1)) * mask
    return count, mean, jnp.sum(jnp.square(deviations), axis=(0, 1, 3))


def valid_moments(
    x: Float[Array, "h w g cg"], valid: Float[Array, "2"]
) -> tuple[Float[Array, " g"], Float[Array, " g"]]:
    """Mean and (biased) variance of each group over the valid top-left part of a
    padded map (`valid`: its fractions of the rows and columns)."""
    owned = jnp.stack([jnp.zeros(2, jnp.float32), valid.astype(jnp.float32)], axis=1)
    count, mean, squares = owned_moments(x, owned)
    return mean, squares / count


def group_norm(
    norm: eqx.nn.GroupNorm, x: Float[Array, "h w c"], scope: Scope, *, silu: bool = False
) -> tuple[Float[Array, "h w c"], Observed]:
    """GroupNorm (optionally followed by SiLU) of a channels-last map; `scope` is the
    GroupNorm's own (its `place` keys `policy.norm_stats`).

    Statistics, the affine transform and the activation are computed in float32
    whatever the input dtype, and the result is cast back: half-precision sums over
    millions of pixels would otherwise lose the mean. Returns the result and, when
    `scope` asks for it, the moments of the input over the owned part of the tile.
    """
    h, w, c = x.shape
    groups = norm.groups
    wide = at_least_float32(x.dtype)
    xf = x.astype(wide).reshape(h, w, groups, c // groups)
    given = (scope.policy.norm_stats or {}).get(scope.place)
    if given is not None:
        mean, var = (s.astype(wide) for s in given)
    elif scope.valid is not None:
        mean, var = valid_moments(xf, scope.valid)
    else:
        mean, var = group_moments(xf, scope.policy.axis_name)
    scale = jax.lax.rsqrt(var + norm.eps).reshape(1, 1, groups, 1)
    y = ((xf - mean.reshape(1, 1, groups, 1)) * scale).reshape(h, w, c)
    if norm.weight is not None:
        y = y * norm.weight.astype(wide).reshape(1, 1, c)
    if norm.bias is not None:
        y = y + norm.bias.astype(wide).reshape(1, 1, c)
    if silu:
        y = jax.nn.silu(y)
    observed = {} if scope.owned is None else {scope.place: owned_moments(xf, scope.owned)}
    return y.astype(x.dtype), observed
