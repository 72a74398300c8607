from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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
    if _use_winograd(weight, x, padding, stride, conv.dilation, ctx):
        y = winograd_conv3x3(weight, x)
        if conv.bias is not None:
            y = y + conv.bias.reshape(1, 1, -1).astype(y.dtype)
        return y
    xc, scale = to_compute(x, ctx)
    if _use_taps(weight, padding, stride, conv.dilation):
        y = taps_conv3x3(weight.astype(xc.dtype), xc, out_dtype)
        if scale is not None:
            y = y * scale
        if conv.bias is not None:
            y = y + conv.bias.reshape(1, 1, -1).astype(y.dtype)
        return y
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


# Winograd's minimal filtering F(4, 3) along the width: four outputs of a 3-tap filter
# from six products instead of twelve (Lavin & Gray, 2016, with the points 0, +-1,
# +-2 and infinity). Applied along one axis only, it turns a 3x3 convolution into six
# 3x1 convolutions on a quarter of the width each: half the multiplications, with
# rounding errors a few times those of the direct convolution (about 2e-6 relative in
# float32, against 4e-7), far inside what the model's parity needs.
_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float32,
)
_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float32,
)
_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    np.float32,
)
# Where the saving outweighs the transforms' memory traffic (measured on CPUs).
_WINOGRAD_MIN_CHANNELS = 256
_WINOGRAD_MIN_WIDTH = 128


def _use_winograd(
    weight: Array,
    x: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    stride: tuple[int, int],
    dilation: tuple[int, ...],
    ctx: Context,
) -> bool:
    return (
        weight.shape[2:] == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and padding == ((0, 0), (1, 1))
        and min(weight.shape[0], weight.shape[1]) >= _WINOGRAD_MIN_CHANNELS
        and x.shape[1] >= _WINOGRAD_MIN_WIDTH
        and x.dtype == jnp.float32
        and ctx.compute_dtype in (None, np.dtype(np.float32))
    )


def _combine(coefficients: np.ndarray, terms: list[Array]) -> Array:
    """`sum(c * t)` over the non-zero coefficients, without multiplying by +-1."""
    out = None
    for c, t in zip(coefficients.tolist(), terms, strict=True):
        if c == 0:
            continue
        term = t if c == 1 else -t if c == -1 else c * t
        out = term if out is None else out + term
    assert out is not None
    return out


def winograd_conv3x3(weight: Float[Array, "o i 3 3"], x: Float[Array, "h2 w i"]) -> Array:
    """A 3x3 convolution of `x` whose rows are already padded (`h + 2` rows in, `h`
    out) and whose columns get zero padding 1, by F(4, 3) along the width."""
    rows, width, _ = x.shape
    blocks = -(-width // 4)
    padded = jnp.pad(x, ((0, 0), (1, 1 + 4 * blocks - width), (0, 0)))
    taps = [padded[:, s : s + 4 * blocks : 4] for s in range(6)]  # (rows, blocks, i) each
    inputs = [_combine(_BT[a], taps) for a in range(6)]
    # The filter transformed along its width: (6, 3 rows, i, o), as 3x1 HWIO kernels.
    kernels = jnp.einsum("aw,oihw->ahio", jnp.asarray(_G), weight.astype(x.dtype))
    products = [
        jax.lax.conv_general_dilated(
            v[None],
            kernels[a][:, None],
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        for a, v in enumerate(inputs)
    ]
    outputs = [_combine(_AT[k], products) for k in range(4)]  # (h, blocks, o) each
    y = jnp.stack(outputs, axis=2).reshape(rows - 2, 4 * blocks, -1)
    return y[:, :width]


# Convolutions to few channels (the decoder's last layer writes 3) keep a
# convolution kernel's vector units mostly idle; one matrix product onto all nine taps'
# outputs at once, then shifted sums, is several times faster.
_TAPS_MAX_CHANNELS = 32


def _use_taps(
    weight: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    stride: tuple[int, int],
    dilation: tuple[int, ...],
) -> bool:
    return (
        weight.shape[2:] == (3, 3)
        and weight.shape[0] <= _TAPS_MAX_CHANNELS
        and weight.shape[1] > weight.shape[0]
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and padding == ((0, 0), (1, 1))
    )


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
    contributions = jnp.matmul(
        x.reshape(rows * width, channels), kernel, preferred_element_type=out_dtype
    ).reshape(rows, width, 3, 3, out)
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
    ).reshape(rows * width, 9 * out)  # (rows, width, 3, 3, out) flattened
    kernel = _tap_kernel(weight)
    dx = jnp.matmul(taps, kernel.T.astype(taps.dtype)).reshape(rows, width, channels)
    dkernel = jnp.matmul(x.reshape(rows * width, channels).T.astype(taps.dtype), taps)
    dweight = jnp.transpose(dkernel.reshape(channels, 3, 3, out), (3, 0, 1, 2))
    return dweight.astype(weight.dtype), dx.astype(x.dtype)


_taps.defvjp(_taps_forward, _taps_backward)
