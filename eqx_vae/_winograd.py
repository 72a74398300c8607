"""Winograd's minimal filtering for wide 3x3 convolutions, along the width."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


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
