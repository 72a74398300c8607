"""Convolutions and linear layers on channels-last activations, with the algorithm for
each convolution chosen in one place (`conv_algorithm`).

The parameters stay in Equinox's layout (`OIHW` weight, `(O, 1, 1)` bias); only the
activations are channels-last, the layout XLA's CPU convolutions are fastest in."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._halo import pad_rows
from ._policy import Policy
from ._precision import to_compute
from ._scope import Scope
from ._taps import taps_conv3x3
from ._winograd import winograd_conv3x3


Padding = tuple[tuple[int, int], tuple[int, int]]

# Measured on CPUs (AMD EPYC and Intel Xeon, 2 threads, BENCHMARKS.md): Winograd's
# F(4,3) along the width beats XLA's convolution for 3x3 layers with at least 256 input
# and output channels on maps at least 128 pixels wide, where the saved multiplications
# outweigh the transforms' memory traffic.
_WINOGRAD_MIN_CHANNELS = 256
_WINOGRAD_MIN_WIDTH = 128
# Convolutions to few channels (the decoder's last layer writes 3) keep a convolution
# kernel's vector units mostly idle on CPU; one matrix product onto all nine taps'
# outputs, then shifted sums, is several times faster.
_TAPS_MAX_CHANNELS = 32


def conv_algorithm(
    weight_shape: tuple[int, ...],
    x_shape: tuple[int, ...],
    x_dtype: np.dtype,
    padding: Padding,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    policy: Policy,
    backend: str | None = None,
) -> str:
    """The algorithm for one convolution of `weight_shape` (OIHW) over an input of
    `x_shape` (HWC, rows already padded): `"direct"`, `"winograd"` or `"taps"`, after
    `policy.conv` and, for `"auto"`, the measured heuristics of `backend` (by default
    JAX's default backend; the heuristics are CPU measurements and apply there only)."""
    same_3x3 = (
        tuple(weight_shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and padding == ((0, 0), (1, 1))
    )
    # Winograd is written for float32 only; in half precision it would lose the
    # power-of-two scaling that keeps float16 in range.
    winograd_ok = (
        same_3x3
        and np.dtype(x_dtype) == np.float32
        and (policy.dtype is None or policy.dtype == np.float32)
    )
    if policy.conv == "winograd":
        return "winograd" if winograd_ok else "direct"
    if policy.conv == "taps":
        return "taps" if same_3x3 else "direct"
    if policy.conv == "direct" or (backend or jax.default_backend()) != "cpu":
        return "direct"
    out, channels = weight_shape[:2]
    if (
        winograd_ok
        and min(out, channels) >= _WINOGRAD_MIN_CHANNELS
        and x_shape[1] >= _WINOGRAD_MIN_WIDTH
    ):
        return "winograd"
    if same_3x3 and out <= _TAPS_MAX_CHANNELS and channels > out:
        return "taps"
    return "direct"


def check_conv(layer: eqx.nn.Conv2d) -> None:
    """Refuses `eqx.nn.Conv2d` options that these convolutions do not implement."""
    problems = []
    if layer.groups != 1:
        problems.append(f"groups={layer.groups}")
    if layer.padding_mode != "ZEROS":
        problems.append(f"padding_mode={layer.padding_mode!r}")
    if layer.num_spatial_dims != 2:
        problems.append(f"num_spatial_dims={layer.num_spatial_dims}")
    padding = layer.padding
    if isinstance(padding, str) or any(not isinstance(p, tuple) for p in padding):
        problems.append(f"padding={padding!r}")
    if problems:
        raise ValueError(
            f"eqx_vae's convolutions implement plain zero-padded 2D convolutions with "
            f"numeric padding; this layer has {', '.join(problems)}. Build it with "
            "`groups=1`, `padding_mode='ZEROS'` and padding given as numbers."
        )


def conv(layer: eqx.nn.Conv2d, x: Float[Array, "h w c"], scope: Scope) -> Float[Array, "h2 w2 o"]:
    """Applies `layer` to a channels-last map under `scope`'s policy (compute dtype,
    algorithm, and halo rows from the neighbouring shards when the height is
    sharded)."""
    check_conv(layer)
    if tuple(layer.kernel_size) != (1, 1):
        x = scope.zero_padding(x)
    (top, bottom), (left, right) = layer.padding  # pyright: ignore[reportGeneralTypeIssues]
    x = pad_rows(x, int(top), int(bottom), scope.policy.axis_name)
    stride = (int(layer.stride[0]), int(layer.stride[1]))
    dilation = (int(layer.dilation[0]), int(layer.dilation[1]))
    padding = ((0, 0), (int(left), int(right)))
    return convolve(layer.weight, layer.bias, x, padding, stride, dilation, scope.policy)


def convolve(
    weight: Float[Array, "o i kh kw"],
    bias: Float[Array, "o 1 1"] | None,
    x: Float[Array, "h w i"],
    padding: Padding,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    policy: Policy,
) -> Float[Array, "h2 w2 o"]:
    """`weight` (OIHW) convolved with `x` (HWC, rows already padded), plus `bias`, by the
    algorithm `conv_algorithm` chooses. The result is in the stream dtype (float32 under
    a half-precision policy)."""
    out_dtype = policy.stream_dtype(x.dtype)
    algorithm = conv_algorithm(
        weight.shape, x.shape, np.dtype(x.dtype), padding, stride, dilation, policy
    )
    if algorithm == "winograd":
        y = winograd_conv3x3(weight, x)
    else:
        xc, scale = to_compute(x, policy.dtype)
        if algorithm == "taps":
            y = taps_conv3x3(weight.astype(xc.dtype), xc, out_dtype)
        else:
            # The kernel goes in as HWIO: the layout XLA's CPU convolution kernels take.
            # Given OIHW, XLA transposes it itself, except inside loops (`lax.map`,
            # `scan`), where it falls back to a generic convolution about 17x slower.
            kernel = jnp.transpose(weight.astype(xc.dtype), (2, 3, 1, 0))
            y = jax.lax.conv_general_dilated(
                xc[None],
                kernel,
                window_strides=stride,
                padding=padding,
                rhs_dilation=dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=None if policy.dtype is None else out_dtype,
            )[0]
        if scale is not None:
            y = y * scale
    if bias is not None:
        y = y + bias.reshape(1, 1, -1).astype(y.dtype)
    return y


def linear(layer: eqx.nn.Linear, x: Float[Array, "n i"], policy: Policy) -> Float[Array, "n o"]:
    """Applies `layer` to each row of `x` under `policy`."""
    out_dtype = policy.stream_dtype(x.dtype)
    xc, scale = to_compute(x, policy.dtype)
    y = jnp.matmul(
        xc,
        layer.weight.astype(xc.dtype).T,
        preferred_element_type=None if policy.dtype is None else out_dtype,
    )
    if scale is not None:
        y = y * scale
    if layer.bias is not None:
        y = y + layer.bias[None, :].astype(y.dtype)
    return y
