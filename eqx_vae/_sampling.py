import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._context import DEFAULT, Context
from ._conv import conv_apply, conv_hwc, pad_rows, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray


class Downsample2D(eqx.Module):
    """Halves the resolution: zero-pad one row at the bottom and one column at the
    right, then a 3x3 convolution with stride 2 and no further padding.

    The asymmetric padding is what the published weights were trained with; padding
    both sides would shift the output by half a pixel.
    """

    conv: eqx.nn.Conv2d
    channels: int = eqx.field(static=True)

    def __init__(self, channels: int, dtype: DTypeLike | None = None, *, key: KeyArray):
        """**Arguments:**

        - `channels`: channels of the input and the output.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        self.channels = channels
        self.conv = eqx.nn.Conv2d(
            channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, key=key
        )

    def __call__(
        self, x: Float[Array, "{self.channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.channels} h//2 w//2"]:
        """**Arguments:**

        - `x`: an unbatched image of shape `(channels, height, width)` with even height
            and width.
        - `key`: ignored.

        **Returns:**

        An array of shape `(channels, height // 2, width // 2)`.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h//2 w//2 {self.channels}"]:
        """The same computation on a channels-last image; see `Context` for `ctx`."""
        return conv_hwc(self.conv, x, ctx)


class Upsample2D(eqx.Module):
    """Doubles the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    conv: eqx.nn.Conv2d
    channels: int = eqx.field(static=True)

    def __init__(self, channels: int, dtype: DTypeLike | None = None, *, key: KeyArray):
        """**Arguments:**

        - `channels`: channels of the input and the output.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        self.channels = channels
        self.conv = eqx.nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype, key=key)

    def __call__(
        self, x: Float[Array, "{self.channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.channels} 2*h 2*w"]:
        """**Arguments:**

        - `x`: an unbatched image of shape `(channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An array of shape `(channels, 2 * height, 2 * width)`.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "2*h 2*w {self.channels}"]:
        """The same computation on a channels-last image.

        Nearest-neighbour upsampling repeats each pixel in a 2x2 block, so each of the
        four output phases `(2i + a, 2j + b)` of the 3x3 convolution sees only two
        distinct rows and two distinct columns of the input. Summing the kernel taps
        that fall on the same input pixel gives four 2x2 convolutions of the
        low-resolution map: the same result with 4/9 of the multiplications and without
        the upsampled intermediate.
        """
        return upsample_conv_hwc(self.conv, x, ctx)


def _phase_kernels(weight: Array, axis: int) -> tuple[Array, Array]:
    """The two 2-tap kernels, along `axis`, of a 3-tap kernel applied after
    nearest-neighbour upsampling: even outputs read `(i - 1, i)` with taps
    `(w0, w1 + w2)`, odd outputs read `(i, i + 1)` with taps `(w0 + w1, w2)`."""
    w0, w1, w2 = (jnp.take(weight, i, axis=axis) for i in range(3))
    return jnp.stack([w0, w1 + w2], axis=axis), jnp.stack([w0 + w1, w2], axis=axis)


def upsample_conv_hwc(
    conv: eqx.nn.Conv2d, x: Float[Array, "h w c"], ctx: Context = DEFAULT
) -> Float[Array, "2*h 2*w o"]:
    """`conv(nearest_upsample_2x(x))` for a 3x3 convolution with padding 1, as four
    2x2 convolutions of `x`, interleaved."""
    h, w, _ = x.shape
    padded = pad_rows(x, 1, 1, ctx)
    rows = []
    for a, row_kernel in enumerate(_phase_kernels(conv.weight, 2)):
        phases = []
        for b, kernel in enumerate(_phase_kernels(row_kernel, 3)):
            window = padded[a : a + h + 1]
            width_padding = (1 - b, b)  # even columns read (j - 1, j), odd (j, j + 1)
            phases.append(conv_apply(conv, kernel, window, ((0, 0), width_padding), (1, 1), ctx))
        rows.append(jnp.stack(phases, axis=2))  # (h, w, 2, o): b interleaved
    return jnp.stack(rows, axis=1).reshape(2 * h, 2 * w, -1)  # a interleaved
