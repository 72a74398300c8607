"""Padding the height of a channels-last map: zeros, or, when the height is split over
devices, the neighbouring shards' rows."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def pad_rows(
    x: Float[Array, "h w c"], top: int, bottom: int, axis_name: str | None
) -> Float[Array, "h2 w c"]:
    """`x` with `top` rows above and `bottom` rows below: zeros, or, when the height is
    sharded over `axis_name`, the neighbouring shards' rows (zeros at the image's
    edges)."""
    if top == 0 and bottom == 0:
        return x
    if axis_name is None:
        return jnp.pad(x, ((top, bottom), (0, 0), (0, 0)))
    n = jax.lax.axis_size(axis_name)
    parts = []
    if top:
        # Shard i receives the last `top` rows of shard i - 1; shard 0 receives zeros.
        down = [(i, i + 1) for i in range(n - 1)]
        parts.append(jax.lax.ppermute(x[x.shape[0] - top :], axis_name, down))
    parts.append(x)
    if bottom:
        up = [(i + 1, i) for i in range(n - 1)]
        parts.append(jax.lax.ppermute(x[:bottom], axis_name, up))
    return jnp.concatenate(parts, axis=0)


def to_hwc(x: Float[Array, "c h w"]) -> Float[Array, "h w c"]:
    return jnp.transpose(x, (1, 2, 0))


def to_chw(x: Float[Array, "h w c"]) -> Float[Array, "c h w"]:
    return jnp.transpose(x, (2, 0, 1))
