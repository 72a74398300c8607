import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._custom_types import DTypeLike
from ._precision import stream_dtype


CONV_ALGORITHMS = ("auto", "direct", "winograd", "taps")
ATTENTION_ALGORITHMS = ("auto", "blocked", "xla")


def _compute_dtype(dtype: DTypeLike | None) -> np.dtype | None:
    if dtype is None:
        return None
    out = np.dtype(jnp.dtype(dtype))
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(
            f"`dtype` (the compute dtype) must be floating point, got {out}; use "
            "jnp.float32, jnp.bfloat16 or jnp.float16."
        )
    return out


def _stats(
    stats: Mapping[str, tuple[Any, Any]] | None,
) -> dict[str, tuple[Array, Array]] | None:
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        raise ValueError(
            "`norm_stats` must map GroupNorm places (such as 'up_blocks.0.resnets.1.norm2') "
            f"to (mean, variance) pairs, got {type(stats).__name__}."
        )
    out = {}
    for place, pair in stats.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(
                f"`norm_stats[{place!r}]` must be a (mean, variance) pair of arrays with one "
                f"value per group, got {pair!r}."
            )
        out[str(place)] = (jnp.asarray(pair[0]), jnp.asarray(pair[1]))
    return out


class Policy(eqx.Module):
    """How a forward pass runs, as opposed to what it computes: the same for every
    module of eqx_vae, passed by keyword (`block(x, policy=...)`,
    `model.decode(z, policy=...)`). The default, `Policy()`, runs in the input's dtype on
    one device.

    A `Policy` is immutable; [`eqx_vae.Policy.replace`][] returns a changed copy. It is a
    pytree (its `norm_stats` are arrays, everything else is static), so it can be an
    argument of `eqx.filter_jit`.

    **Fields:**

    - `dtype`: the compute dtype of convolutions and matmuls (`None`: the input's). In
        `bfloat16` or `float16` the convolution and matmul inputs are half precision
        while GroupNorm statistics, softmax, accumulation and the activations between
        layers stay float32, so nothing overflows; in `float16` each convolution's input
        is first divided by a power of two that keeps it in range (lossless).
        `AutoencoderKL.encode`/`decode` additionally compute a `float16` request in
        float32 on a model whose config sets `force_upcast`, as diffusers does (see
        [`eqx_vae.AutoencoderKL.resolve_policy`][]).
    - `checkpoint`: recompute each ResNet and attention block's activations in the
        backward pass instead of storing them (less memory in training, same gradients).
    - `axis_name`: inside `shard_map` (or `jax.pmap`), the mesh axis the image *height*
        is split over: convolutions exchange halo rows with the neighbouring shards,
        GroupNorm statistics are summed over the axis and attention gathers the keys and
        values of the whole image. See [`eqx_vae.sharded_decode`][].
    - `attention_block_bytes`: the largest block of attention scores to materialise;
        longer sequences are processed in blocks of queries, so memory grows linearly
        with the number of pixels.
    - `conv`: the convolution algorithm. `"auto"` chooses per layer: on CPU, Winograd's
        F(4,3) along the width for wide 3x3 layers on wide maps and one matrix product
        over the taps for layers with few output channels (both measured faster there),
        otherwise `lax.conv_general_dilated`; on GPU and TPU always
        `lax.conv_general_dilated`. `"direct"`, `"winograd"` and `"taps"` force one
        algorithm wherever it applies (the latter two to 3x3, stride-1 layers only).
    - `attention`: `"auto"` uses `jax.nn.dot_product_attention` on GPU and TPU when the
        score matrix fits in `attention_block_bytes` (and the compute dtype is not
        float16), otherwise `"blocked"`: float32 scores and softmax in blocks of
        queries. `"xla"` forces `jax.nn.dot_product_attention`.
    - `norm_stats`: GroupNorm statistics to use instead of the input's, as a mapping
        from a GroupNorm's place relative to the module called (for `model.decode`:
        `"decoder.up_blocks.0.resnets.1.norm2"`) to its `(mean, variance)`, one value
        per group. Tiled processing ([`eqx_vae.tiled_decode`][]) passes the whole
        image's statistics this way; GroupNorms not listed use their input's.

    !!! Example

        ```python
        policy = eqx_vae.Policy(dtype=jnp.bfloat16, checkpoint=True)
        y = block(x, policy=policy)                 # any eqx_vae block
        image = model.decode(z, policy=policy)      # the same policy in the model
        ```
    """

    dtype: np.dtype | None = eqx.field(static=True)
    checkpoint: bool = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True)
    attention_block_bytes: int = eqx.field(static=True)
    conv: Literal["auto", "direct", "winograd", "taps"] = eqx.field(static=True)
    attention: Literal["auto", "blocked", "xla"] = eqx.field(static=True)
    norm_stats: dict[str, tuple[Float[Array, " _groups"], Float[Array, " _groups"]]] | None

    def __init__(
        self,
        dtype: DTypeLike | None = None,
        checkpoint: bool = False,
        axis_name: str | None = None,
        attention_block_bytes: int = 64 * 2**20,
        conv: Literal["auto", "direct", "winograd", "taps"] = "auto",
        attention: Literal["auto", "blocked", "xla"] = "auto",
        norm_stats: Mapping[str, tuple[Any, Any]] | None = None,
    ):
        self.dtype = _compute_dtype(dtype)
        self.checkpoint = checkpoint
        self.axis_name = axis_name
        self.attention_block_bytes = attention_block_bytes
        self.conv = conv
        self.attention = attention
        self.norm_stats = _stats(norm_stats)

    def __check_init__(self):
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"`checkpoint` must be a bool, got {self.checkpoint!r}.")
        if self.axis_name is not None and not isinstance(self.axis_name, str):
            raise ValueError(f"`axis_name` must be a mesh axis name, got {self.axis_name!r}.")
        block = self.attention_block_bytes
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise ValueError(
                f"`attention_block_bytes` must be a positive number of bytes, got {block!r}."
            )
        if self.conv not in CONV_ALGORITHMS:
            raise ValueError(f"`conv` must be one of {CONV_ALGORITHMS}, got {self.conv!r}.")
        if self.attention not in ATTENTION_ALGORITHMS:
            raise ValueError(
                f"`attention` must be one of {ATTENTION_ALGORITHMS}, got {self.attention!r}."
            )

    def replace(self, **changes: Any) -> "Policy":
        """A copy with some fields changed (and checked again)."""
        return dataclasses.replace(self, **changes)

    def stream_dtype(self, x_dtype: Any) -> np.dtype:
        """The dtype of the activations between layers for an input of `x_dtype`: the
        input's in full precision, float32 when computing in half precision."""
        return stream_dtype(self.dtype, x_dtype)


def resolve(
    policy: Policy | None, dtype: DTypeLike | None, default: np.dtype, *, force_upcast: bool
) -> Policy:
    """`policy` (by default `Policy()`) with its compute dtype settled: `dtype` (which
    must not contradict `policy.dtype`), else `policy.dtype`, else `default`; a float16
    request computes in float32 when `force_upcast` is set."""
    policy = Policy() if policy is None else policy
    if dtype is not None:
        requested = np.dtype(jnp.dtype(dtype))
        if policy.dtype is not None and policy.dtype != requested:
            raise ValueError(
                f"`dtype={requested}` contradicts the policy's `dtype={policy.dtype}`; give "
                "the compute dtype in one place."
            )
        policy = policy.replace(dtype=requested)
    if policy.dtype is None:
        policy = policy.replace(dtype=default)
    if policy.dtype == np.float16 and force_upcast:
        policy = policy.replace(dtype=np.float32)
    return policy
