"""3x3 convolutions to few output channels as one matrix product over the taps."""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def taps_conv3x3(
    weight: Float[Array, "o i 3 3"], x: Float[Array, "h2 w i"], out_dtype: Any
) -> Array:
    """A 3x3 convolution with few output channels of `x`, whose rows are already
    padded (`h + 2` in, `h` out), with zero padding 1 on the columns: every input pixel's
    contribution to every tap, by one matrix product, summed over the taps' shifts.

    Its gradient is written out (`_taps_backward`): differentiating the shifted sum
    itself would pad each tap's cotangent to the size of all nine taps' contributions,
    and keep the nine alive at once."""
    return _taps(weight, x, out_dtype)


def _tap_kernel(weight: Array) -> Array:
    """`weight` (o, i, 3, 3) as the matrix (i, 3 * 3 * o) of every tap's outputs."""
    out, channels = weight.shape[:2]
    return jnp.transpose(weight, (1, 2, 3, 0)).reshape(channels, 9 * out)


def _taps_conv3x3(weight: Array, x: Array, out_dtype: Any) -> Array:
    rows, width, channels = x.shape
    out = weight.shape[0]
    kernel = _tap_kernel(weight)
    # Each reshape splits or merges one axis only: those have a sharding rule on a mesh
    # with explicit axes (a batch sharded under jax.vmap), two at once have none.
    contributions = jnp.matmul(
        x.reshape(rows * width, channels), kernel, preferred_element_type=out_dtype
    ).reshape(rows, width, 9 * out)
    contributions = contributions.reshape(rows, width, 3, 3, out)
    contributions = jnp.pad(contributions, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    y = None
    for i in range(3):
        for j in range(3):
            term = contributions[i : i + rows - 2, j : j + width, i, j]
            y = term if y is None else y + term
    assert y is not None
    return y


_taps = jax.custom_vjp(_taps_conv3x3, nondiff_argnums=(2,))


def _taps_forward(weight: Array, x: Array, out_dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    return _taps_conv3x3(weight, x, out_dtype), (weight, x)


def _taps_backward(
    out_dtype: Any, residuals: tuple[Array, Array], cotangent: Array
) -> tuple[Array, Array]:
    """The gradients by matrix products: the cotangent of every tap's contribution is a
    shifted copy of the output's cotangent, stacked once."""
    del out_dtype
    weight, x = residuals
    rows, width, channels = x.shape
    out = weight.shape[0]
    padded = jnp.pad(cotangent, ((2, 2), (1, 1), (0, 0)))
    taps = jnp.stack(
        [
            jnp.stack([padded[2 - i : 2 - i + rows, 2 - j : 2 - j + width] for j in range(3)], 2)
            for i in range(3)
        ],
        2,
    )  # (rows, width, 3, 3, out), flattened one axis at a time as in _taps_conv3x3
    taps = taps.reshape(rows, width, 9 * out).reshape(rows * width, 9 * out)
    kernel = _tap_kernel(weight)
    dx = jnp.matmul(taps, kernel.T.astype(taps.dtype)).reshape(rows, width, channels)
    dkernel = jnp.matmul(x.reshape(rows * width, channels).T.astype(taps.dtype), taps)
    dweight = jnp.transpose(dkernel.reshape(channels, 3, 3, out), (3, 0, 1, 2))
    return dweight.astype(weight.dtype), dx.astype(x.dtype)


_taps.defvjp(_taps_forward, _taps_backward)
