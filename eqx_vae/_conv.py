import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def conv_hwc(conv: eqx.nn.Conv2d, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 o"]:
    """Applies `conv` to a channels-last image, computing in the image's dtype.

    The parameters stay in Equinox's layout (`OIHW` weight, `(O, 1, 1)` bias); only the
    activations are channels-last, which is the layout XLA's CPU convolutions are
    fastest in. Stride, padding and dilation are read from `conv`.
    """
    weight = conv.weight.astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x[None],
        weight,
        window_strides=conv.stride,
        padding=conv.padding,
        rhs_dilation=conv.dilation,
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
    )[0]
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, 1, -1).astype(x.dtype)
    return y


def linear(layer: eqx.nn.Linear, x: Float[Array, "n i"]) -> Float[Array, "n o"]:
    """Applies `layer` to each row of `x`, computing in `x`'s dtype."""
    y = x @ layer.weight.astype(x.dtype).T
    if layer.bias is not None:
        y = y + layer.bias[None, :].astype(x.dtype)
    return y


def to_hwc(x: Float[Array, "c h w"]) -> Float[Array, "h w c"]:
    return jnp.transpose(x, (1, 2, 0))


def to_chw(x: Float[Array, "h w c"]) -> Float[Array, "c h w"]:
    return jnp.transpose(x, (2, 0, 1))
