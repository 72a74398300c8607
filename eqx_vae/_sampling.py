import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._conv import conv_hwc, to_chw, to_hwc
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
        self, x: Float[Array, "h w {self.channels}"]
    ) -> Float[Array, "h//2 w//2 {self.channels}"]:
        """The same computation on a channels-last image."""
        return conv_hwc(self.conv, x)


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
        self, x: Float[Array, "h w {self.channels}"]
    ) -> Float[Array, "2*h 2*w {self.channels}"]:
        """The same computation on a channels-last image."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)
        return conv_hwc(self.conv, x)
