from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _init as init
from ._block import SameChannelsBlock
from ._conv import check_conv, conv, convolve
from ._custom_types import DTypeLike, KeyArray, Observed
from ._halo import pad_rows
from ._scope import Scope


class _Resampler(SameChannelsBlock):
    """A block of one 3x3 convolution that keeps the channel count and changes the
    resolution."""

    conv: eqx.AbstractVar[eqx.nn.Conv2d]
    channels: eqx.AbstractVar[int]


class Downsample2D(_Resampler):
    """Halves the resolution: zero-pad one row at the bottom and one column at the
    right, then a 3x3 convolution with stride 2 and no further padding.

    The asymmetric padding is what the published weights were trained with; padding
    both sides would shift the output by half a pixel.

    Called as `block(x, policy=...)` on `(channels, height, width)` with even height
    and width; returns `(channels, height // 2, width // 2)`.
    """

    conv: eqx.nn.Conv2d
    channels: int = eqx.field(static=True)
    _scale: ClassVar[float] = 0.5

    def __init__(self, channels: int, dtype: DTypeLike | None = None, *, key: KeyArray):
        """**Arguments:**

        - `channels`: channels of the input and the output.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        self.channels = channels
        self.conv = init.conv2d(
            channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, key=key
        )

    def _compute(
        self, x: Float[Array, "h w {self.channels}"], scope: Scope
    ) -> tuple[Float[Array, "h//2 w//2 {self.channels}"], Observed]:
        return conv(self.conv, x, scope), {}


class Upsample2D(_Resampler):
    """Doubles the resolution: nearest-neighbour upsampling, then a 3x3 convolution.

    Nearest-neighbour upsampling repeats each pixel in a 2x2 block, so each of the four
    output phases `(2i + a, 2j + b)` of the 3x3 convolution sees only two distinct rows
    and two distinct columns of the input. Summing the kernel taps that fall on the same
    input pixel gives four 2x2 convolutions of the low-resolution map: the same result
    with 4/9 of the multiplications and without the upsampled intermediate.

    Called as `block(x, policy=...)` on `(channels, height, width)`; returns
    `(channels, 2 * height, 2 * width)`.
    """

    conv: eqx.nn.Conv2d
    channels: int = eqx.field(static=True)
    _scale: ClassVar[float] = 2.0

    def __init__(self, channels: int, dtype: DTypeLike | None = None, *, key: KeyArray):
        """**Arguments:**

        - `channels`: channels of the input and the output.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        self.channels = channels
        self.conv = init.conv2d(channels, channels, 3, padding=1, dtype=dtype, key=key)

    def _compute(
        self, x: Float[Array, "h w {self.channels}"], scope: Scope
    ) -> tuple[Float[Array, "2*h 2*w {self.channels}"], Observed]:
        return upsample_conv(self.conv, x, scope), {}


def _phase_kernels(weight: Array, axis: int) -> tuple[Array, Array]:
    """The two 2-tap kernels, along `axis`, of a 3-tap kernel applied after
    nearest-neighbour upsampling: even outputs read `(i - 1, i)` with taps
    `(w0, w1 + w2)`, odd outputs read `(i, i + 1)` with taps `(w0 + w1, w2)`."""
    w0, w1, w2 = (jnp.take(weight, i, axis=axis) for i in range(3))
    return jnp.stack([w0, w1 + w2], axis=axis), jnp.stack([w0 + w1, w2], axis=axis)


def upsample_conv(
    layer: eqx.nn.Conv2d, x: Float[Array, "h w c"], scope: Scope
) -> Float[Array, "2*h 2*w o"]:
    """`layer(nearest_upsample_2x(x))` for a 3x3 convolution with padding 1, as four
    2x2 convolutions of `x`, interleaved."""
    check_conv(layer)
    if (
        tuple(layer.kernel_size) != (3, 3)
        or tuple(layer.stride) != (1, 1)
        or tuple(layer.dilation) != (1, 1)
        or layer.padding != ((1, 1), (1, 1))
    ):
        raise ValueError(
            "Upsample2D's convolution must be 3x3 with stride 1 and padding 1, got "
            f"kernel {layer.kernel_size}, stride {layer.stride}, padding {layer.padding}."
        )
    h, w, _ = x.shape
    padded = pad_rows(scope.zero_padding(x), 1, 1, scope.policy.axis_name)
    rows = []
    for a, row_kernel in enumerate(_phase_kernels(layer.weight, 2)):
        phases = []
        for b, kernel in enumerate(_phase_kernels(row_kernel, 3)):
            window = padded[a : a + h + 1]
            width_padding = (1 - b, b)  # even columns read (j - 1, j), odd (j, j + 1)
            phases.append(
                convolve(
                    kernel,
                    layer.bias,
                    window,
                    ((0, 0), width_padding),
                    (1, 1),
                    (1, 1),
                    scope.policy,
                )
            )
        rows.append(jnp.stack(phases, axis=2))  # (h, w, 2, o): b interleaved
    # (h, 2, w, 2, o) -> (2h, 2w, o), one merge at a time: a reshape that merges two
    # pairs of axes at once has no sharding rule on a mesh with explicit axes.
    merged = jnp.stack(rows, axis=1).reshape(h, 2, 2 * w, -1)
    return merged.reshape(2 * h, 2 * w, -1)  # a interleaved
