import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._context import DEFAULT, Context
from ._conv import linear, to_chw, to_compute, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._norm import group_norm_hwc, make_group_norm
from ._remat import checkpoint


class AttentionBlock(eqx.Module):
    """Single-head self-attention over all pixels, as in the autoencoder's mid block.

    `x + to_out(softmax(q k^T / sqrt(C)) v)` where `q`, `k`, `v` are linear maps of
    `group_norm(x)` with the pixels as the sequence. The scores and the softmax are
    computed in float32. Long sequences are processed in blocks of queries, so memory
    grows linearly with the number of pixels rather than quadratically.
    """

    group_norm: eqx.nn.GroupNorm
    to_q: eqx.nn.Linear
    to_k: eqx.nn.Linear
    to_v: eqx.nn.Linear
    to_out: tuple[eqx.nn.Linear]
    channels: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        norm_num_groups: int = 32,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `channels`: channels of the input and the output; also the head dimension.
        - `norm_num_groups`: GroupNorm groups; must divide `channels`.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.channels = channels
        self.group_norm = make_group_norm(
            channels, norm_num_groups, dtype=dtype, where=f"AttentionBlock({channels})"
        )
        self.to_q = eqx.nn.Linear(channels, channels, dtype=dtype, key=kq)
        self.to_k = eqx.nn.Linear(channels, channels, dtype=dtype, key=kk)
        self.to_v = eqx.nn.Linear(channels, channels, dtype=dtype, key=kv)
        self.to_out = (eqx.nn.Linear(channels, channels, dtype=dtype, key=ko),)

    def __call__(
        self, x: Float[Array, "{self.channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.channels} h w"]:
        """**Arguments:**

        - `x`: an unbatched image of shape `(channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An array of the same shape.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h w {self.channels}"]:
        """The same computation on a channels-last image; see `Context` for `ctx`."""
        if ctx.checkpoint:
            inner = ctx.replace(checkpoint=False)

            def call(block: "AttentionBlock", x: Array) -> Array:
                return block.call_hwc(x, inner)

            return checkpoint(call)(self, x)
        h, w, c = x.shape
        tokens = group_norm_hwc(self.group_norm, x, ctx).reshape(h * w, c)
        q = linear(self.to_q, tokens, ctx)
        k = linear(self.to_k, tokens, ctx)
        v = linear(self.to_v, tokens, ctx)
        if ctx.axis_name is not None:
            # The queries of this shard attend to the keys of the whole image.
            k = jax.lax.all_gather(k, ctx.axis_name, axis=0, tiled=True)
            v = jax.lax.all_gather(v, ctx.axis_name, axis=0, tiled=True)
        out = attend(q, k, v, ctx)
        out = linear(self.to_out[0], out, ctx)
        return x + out.reshape(h, w, c).astype(x.dtype)


def attend(
    q: Float[Array, "n d"], k: Float[Array, "m d"], v: Float[Array, "m d"], ctx: Context
) -> Float[Array, "n d"]:
    """`softmax(q k^T / sqrt(d)) v`, with float32 scores, in blocks of queries small
    enough that a block of scores stays under `ctx.attention_block_bytes`."""
    n, d = q.shape
    m = k.shape[0]
    block = max(1, ctx.attention_block_bytes // (4 * m))
    qc, q_scale = to_compute(q, ctx)
    kc, k_scale = to_compute(k, ctx)
    vc, v_scale = to_compute(v, ctx)
    out_dtype = ctx.stream_dtype(q.dtype)

    def one_block(q_block: Array) -> Array:
        scores = jnp.matmul(q_block, kc.T, preferred_element_type=jnp.float32) / math.sqrt(d)
        if q_scale is not None:
            scores = scores * q_scale.astype(jnp.float32)
        if k_scale is not None:
            scores = scores * k_scale.astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1).astype(vc.dtype)
        out = jnp.matmul(weights, vc, preferred_element_type=out_dtype)
        return out if v_scale is None else out * v_scale

    if block >= n:
        return one_block(qc)
    blocks = -(-n // block)
    padded = jnp.pad(qc, ((0, blocks * block - n), (0, 0)))
    out = jax.lax.map(one_block, padded.reshape(blocks, block, d))
    return out.reshape(blocks * block, d)[:n]
