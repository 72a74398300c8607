import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._context import DEFAULT, Context


def pad_rows(x: Float[Array, "h w c"], top: int, bottom: int, ctx: Context) -> Array:
    """Pads the height: with zeros, or, when the height is sharded over
    `ctx.axis_name`, with the neighbouring shards' rows (zeros at the image edges)."""
    if top == 0 and bottom == 0:
        return x
    if ctx.axis_name is None:
        return jnp.pad(x, ((top, bottom), (0, 0), (0, 0)))
    n = jax.lax.axis_size(ctx.axis_name)
    parts = []
    if top:
        # Shard i receives the last `top` rows of shard i - 1; shard 0 receives zeros.
        down = [(i, i + 1) for i in range(n - 1)]
        parts.append(jax.lax.ppermute(x[x.shape[0] - top :], ctx.axis_name, down))
    parts.append(x)
    if bottom:
        up = [(i + 1, i) for i in range(n - 1)]
        parts.append(jax.lax.ppermute(x[:bottom], ctx.axis_name, up))
    return jnp.concatenate(parts, axis=0)


def to_compute(x: Array, ctx: Context) -> tuple[Array, Array | None]:
    """`x` in the compute dtype, and the power-of-two factor it was divided by.

    In float16 the input is first divided by a power of two that brings its largest
    magnitude under 2**14, so that activations beyond float16's range (as in the
    SDXL VAE's decoder) cannot overflow; dividing by a power of two loses nothing."""
    dtype = ctx.compute_dtype
    if dtype is None or x.dtype == dtype:
        return x, None
    if dtype == jnp.float16:
        largest = jnp.max(jnp.abs(x)).astype(jnp.float32)
        exponent = jnp.maximum(jnp.ceil(jnp.log2(largest / 2.0**14)), 0.0)
        scale = jnp.exp2(exponent).astype(x.dtype)
        return (x / scale).astype(dtype), scale
    return x.astype(dtype), None


def conv_hwc(
    conv: eqx.nn.Conv2d, x: Float[Array, "h w c"], ctx: Context = DEFAULT
) -> Float[Array, "h2 w2 o"]:
    """Applies `conv` to a channels-last image.

    The parameters stay in Equinox's layout (`OIHW` weight, `(O, 1, 1)` bias); only the
    activations are channels-last, which is the layout XLA's CPU convolutions are
    fastest in. Stride, padding and dilation are read from `conv`. See `Context` for
    the compute dtype and height sharding.
    """
    (top, bottom), (left, right) = conv.padding  # pyright: ignore[reportGeneralTypeIssues]
    x = pad_rows(x, int(top), int(bottom), ctx)
    stride = (conv.stride[0], conv.stride[1])
    return conv_apply(conv, conv.weight, x, ((0, 0), (int(left), int(right))), stride, ctx)


def conv_apply(
    conv: eqx.nn.Conv2d,
    weight: Array,
    x: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    stride: tuple[int, int],
    ctx: Context,
) -> Array:
    """`weight` (OIHW) convolved with `x` (HWC), plus `conv`'s bias, in the context's
    dtypes."""
    out_dtype = ctx.stream_dtype(x.dtype)
    xc, scale = to_compute(x, ctx)
    # The kernel goes in as HWIO: the layout XLA's CPU convolution kernels take. Given
    # OIHW, XLA transposes it itself, except inside loops (`lax.map`, `scan`), where
    # it falls back to a generic convolution about 17x slower.
    kernel = jnp.transpose(weight.astype(xc.dtype), (2, 3, 1, 0))
    y = jax.lax.conv_general_dilated(
        xc[None],
        kernel,
        window_strides=stride,
        padding=padding,
        rhs_dilation=conv.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=None if ctx.compute_dtype is None else out_dtype,
    )[0]
    if scale is not None:
        y = y * scale
    if conv.bias is not None:
        y = y + conv.bias.reshape(1, 1, -1).astype(y.dtype)
    return y


def linear(
    layer: eqx.nn.Linear, x: Float[Array, "n i"], ctx: Context = DEFAULT
) -> Float[Array, "n o"]:
    """Applies `layer` to each row of `x`, in the context's dtypes."""
    out_dtype = ctx.stream_dtype(x.dtype)
    xc, scale = to_compute(x, ctx)
    y = jnp.matmul(
        xc,
        layer.weight.astype(xc.dtype).T,
        preferred_element_type=None if ctx.compute_dtype is None else out_dtype,
    )
    if scale is not None:
        y = y * scale
    if layer.bias is not None:
        y = y + layer.bias[None, :].astype(y.dtype)
    return y


def to_hwc(x: Float[Array, "c h w"]) -> Float[Array, "h w c"]:
    return jnp.transpose(x, (1, 2, 0))


def to_chw(x: Float[Array, "h w c"]) -> Float[Array, "c h w"]:
    return jnp.transpose(x, (2, 0, 1))
