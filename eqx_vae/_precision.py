"""The dtypes of a forward pass: what the convolutions and matmuls compute in, and what
the activations between layers are kept in."""

from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def at_least_float32(dtype: Any) -> np.dtype:
    """`dtype` widened to float32 if it is narrower (float64 stays)."""
    dtype = np.dtype(dtype)
    return dtype if dtype == np.dtype(np.float64) else np.dtype(np.float32)


def stream_dtype(compute: np.dtype | None, x_dtype: Any) -> np.dtype:
    """The dtype of activations between layers: the input's in full precision, float32
    (or wider) whenever the computation is in half precision, so that no activation
    can overflow."""
    if compute is None:
        return np.dtype(x_dtype)
    return at_least_float32(compute)


def to_compute(x: Array, compute: np.dtype | None) -> tuple[Array, Array | None]:
    """`x` in the compute dtype, and the power-of-two factor it was divided by.

    In float16 the input is first divided by a power of two that brings its largest
    magnitude under 2**14, so that activations beyond float16's range (as in the
    SDXL VAE's decoder) cannot overflow; dividing by a power of two loses nothing."""
    if compute is None or x.dtype == compute:
        return x, None
    if compute == jnp.float16:
        largest = jnp.max(jnp.abs(x)).astype(jnp.float32)
        exponent = jnp.maximum(jnp.ceil(jnp.log2(largest / 2.0**14)), 0.0)
        scale = jnp.exp2(exponent).astype(x.dtype)
        return (x / scale).astype(compute), scale
    return x.astype(compute), None
