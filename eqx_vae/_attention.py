import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._conv import linear, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._norm import group_norm_hwc, make_group_norm


class AttentionBlock(eqx.Module):
    """Single-head self-attention over all pixels, as in the autoencoder's mid block.

    `x + to_out(softmax(q k^T / sqrt(C)) v)` where `q`, `k`, `v` are linear maps of
    `group_norm(x)` with the pixels as the sequence. The softmax is computed in float32.
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
        self, x: Float[Array, "h w {self.channels}"]
    ) -> Float[Array, "h w {self.channels}"]:
        """The same computation on a channels-last image."""
        h, w, c = x.shape
        tokens = group_norm_hwc(self.group_norm, x).reshape(h * w, c)
        q = linear(self.to_q, tokens)
        k = linear(self.to_k, tokens)
        v = linear(self.to_v, tokens)
        scores = jnp.matmul(q, k.T, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = linear(self.to_out[0], weights @ v)
        return x + out.reshape(h, w, c)
