import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from . import _init as init
from ._block import SameChannelsBlock
from ._conv import linear
from ._custom_types import DTypeLike, KeyArray, Observed
from ._norm import group_norm, make_group_norm
from ._policy import Policy
from ._precision import to_compute
from ._scope import Scope


class AttentionBlock(SameChannelsBlock):
    """Single-head self-attention over all pixels, as in the autoencoder's mid block.

    `x + to_out(softmax(q k^T / sqrt(C)) v)` where `q`, `k`, `v` are linear maps of
    `group_norm(x)` with the pixels as the sequence. The scores and the softmax are
    computed in float32. Long sequences are processed in blocks of queries, so memory
    grows linearly with the number of pixels rather than quadratically (see
    `Policy.attention_block_bytes` and `Policy.attention`).

    Called as `block(x, policy=...)` on `(channels, height, width)`; returns the same
    shape.
    """

    group_norm: eqx.nn.GroupNorm
    to_q: eqx.nn.Linear
    to_k: eqx.nn.Linear
    to_v: eqx.nn.Linear
    to_out: tuple[eqx.nn.Linear]
    channels: int = eqx.field(static=True)
    _checkpointed: ClassVar[bool] = True
    _whole_image: ClassVar[bool] = True

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
        kq, kk, kv, ko = init.split_keys(key, 4)
        self.channels = channels
        self.group_norm = make_group_norm(
            channels, norm_num_groups, dtype=dtype, where=f"AttentionBlock({channels})"
        )
        self.to_q = init.linear(channels, channels, dtype=dtype, key=kq)
        self.to_k = init.linear(channels, channels, dtype=dtype, key=kk)
        self.to_v = init.linear(channels, channels, dtype=dtype, key=kv)
        self.to_out = (init.linear(channels, channels, dtype=dtype, key=ko),)

    def _compute(
        self, x: Float[Array, "h w {self.channels}"], scope: Scope
    ) -> tuple[Float[Array, "h w {self.channels}"], Observed]:
        h, w, c = x.shape
        normed, observed = group_norm(self.group_norm, x, scope.child("group_norm"))
        tokens = normed.reshape(h * w, c)
        policy = scope.policy
        q = linear(self.to_q, tokens, policy)
        k = linear(self.to_k, tokens, policy)
        v = linear(self.to_v, tokens, policy)
        if policy.axis_name is not None:
            # The queries of this shard attend to the keys of the whole image.
            k = jax.lax.all_gather(k, policy.axis_name, axis=0, tiled=True)
            v = jax.lax.all_gather(v, policy.axis_name, axis=0, tiled=True)
        valid = scope.valid_mask(h, w)
        keys = None if valid is None else valid.reshape(h * w)
        out = linear(self.to_out[0], attend(q, k, v, policy, keys), policy)
        return x + out.reshape(h, w, c).astype(x.dtype), observed


def attention_algorithm(
    queries: int, keys: int, policy: Policy, backend: str | None = None
) -> str:
    """`"blocked"` or `"xla"` for `queries` attending to `keys`, after `policy.attention`
    (see [`eqx_vae.Policy`][]); `backend` is JAX's default backend unless given."""
    if policy.attention != "auto":
        return policy.attention
    if (backend or jax.default_backend()) == "cpu" or policy.dtype == np.float16:
        return "blocked"
    return "xla" if 4 * queries * keys <= policy.attention_block_bytes else "blocked"


def attend(
    q: Float[Array, "n d"],
    k: Float[Array, "m d"],
    v: Float[Array, "m d"],
    policy: Policy,
    keys: Bool[Array, " m"] | None = None,
) -> Float[Array, "n d"]:
    """`softmax(q k^T / sqrt(d)) v` with float32 scores, by the algorithm
    `attention_algorithm` chooses; with `keys` given, only the keys it marks are
    attended to."""
    n, d = q.shape
    out_dtype = policy.stream_dtype(q.dtype)
    if attention_algorithm(n, k.shape[0], policy) == "xla":
        compute = q.dtype if policy.dtype is None else policy.dtype
        q4, k4, v4 = (a.astype(compute)[None, :, None, :] for a in (q, k, v))
        mask = None if keys is None else keys[None, None, None, :]
        out = jax.nn.dot_product_attention(q4, k4, v4, mask=mask, scale=1.0 / math.sqrt(d))
        return out[0, :, 0, :].astype(out_dtype)
    return _blocked_attention(q, k, v, policy, out_dtype, keys)


def _blocked_attention(
    q: Array, k: Array, v: Array, policy: Policy, out_dtype: np.dtype, keys: Array | None
) -> Array:
    """Attention in blocks of queries small enough that a block of float32 scores stays
    under `policy.attention_block_bytes`."""
    n, d = q.shape
    m = k.shape[0]
    block = max(1, policy.attention_block_bytes // (4 * m))
    qc, q_scale = to_compute(q, policy.dtype)
    kc, k_scale = to_compute(k, policy.dtype)
    vc, v_scale = to_compute(v, policy.dtype)

    def one_block(q_block: Array) -> Array:
        scores = jnp.matmul(q_block, kc.T, preferred_element_type=jnp.float32) / math.sqrt(d)
        if q_scale is not None:
            scores = scores * q_scale.astype(jnp.float32)
        if k_scale is not None:
            scores = scores * k_scale.astype(jnp.float32)
        if keys is not None:
            scores = jnp.where(keys[None, :], scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(vc.dtype)
        out = jnp.matmul(weights, vc, preferred_element_type=out_dtype)
        return out if v_scale is None else out * v_scale

    if block >= n:
        return one_block(qc)
    blocks = -(-n // block)
    padded = jnp.pad(qc, ((0, blocks * block - n), (0, 0)))
    out = jax.lax.map(one_block, padded.reshape(blocks, block, d))
    return out.reshape(blocks * block, d)[:n]
