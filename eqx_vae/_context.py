import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._custom_types import DTypeLike


@dataclasses.dataclass(frozen=True)
class Context:
    """How a forward pass runs, as opposed to what it computes. Passed down through
    every layer's `call_hwc`; the default runs everything in the input's dtype on one
    device.

    - `compute_dtype`: the dtype of convolution and matmul inputs and weights. With a
        half-precision dtype, the activations between layers, the accumulations and
        every normalisation stay in float32 (see `stream_dtype`).
    - `axis_name`: inside `shard_map`, the mesh axis the image height is split over:
        convolutions exchange halo rows with the neighbouring shards, GroupNorm
        statistics and attention keys are reduced over the axis.
    - `norm_stats`: for tiled processing, where GroupNorm statistics come from and go
        to (see `eqx_vae._tiling`).
    - `attention_block_bytes`: the largest attention-score block to materialise; longer
        sequences are processed in blocks of queries.
    - `checkpoint`: recompute each ResNet and attention block's activations in the
        backward pass instead of storing them (`eqx_vae._remat.checkpoint`: Equinox's
        `filter_checkpoint` on accelerators, a form the CPU compiler keeps on CPUs),
        trading compute for memory in training.
    """

    compute_dtype: np.dtype | None = None
    axis_name: str | None = None
    norm_stats: Any = None
    attention_block_bytes: int = 64 * 2**20
    checkpoint: bool = False

    def stream_dtype(self, x_dtype: Any) -> np.dtype:
        """The dtype of activations between layers: float32 (or wider) whenever the
        computation is in half precision, so that no activation can overflow."""
        if self.compute_dtype is None:
            return np.dtype(x_dtype)
        return at_least_float32(self.compute_dtype)

    def replace(self, **changes: Any) -> "Context":
        return dataclasses.replace(self, **changes)


DEFAULT = Context()


def at_least_float32(dtype: Any) -> np.dtype:
    """`dtype` widened to float32 if it is narrower (float64 stays)."""
    dtype = np.dtype(dtype)
    return dtype if dtype == np.dtype(np.float64) else np.dtype(np.float32)


def resolve_compute_dtype(
    requested: DTypeLike | None, param_dtype: Any, force_upcast: bool
) -> np.dtype:
    """The compute-dtype policy: the requested dtype, by default the parameters'; a
    float16 request on a model whose config sets `force_upcast` (the published SD and
    SDXL VAEs, whose activations exceed float16's range) computes in float32, as
    diffusers' pipelines do."""
    dtype = np.dtype(jnp.dtype(param_dtype if requested is None else requested))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"The compute dtype must be floating point, got {dtype}.")
    if dtype == np.dtype(np.float16) and force_upcast:
        return np.dtype(np.float32)
    return dtype
