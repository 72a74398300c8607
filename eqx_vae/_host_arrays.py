from typing import Any

import numpy as np


# XLA's CPU client adopts a host buffer aligned to 64 bytes as a JAX array without
# copying it, and copies less aligned ones.
_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new uninitialised array whose data starts on a 64-byte boundary, so that
    `jax.device_put` can adopt it instead of copying it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)
