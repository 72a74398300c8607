from typing import ClassVar

import equinox as eqx
from jaxtyping import Array, Float

from . import _init as init
from ._block import Block
from ._conv import conv
from ._custom_types import DTypeLike, KeyArray, Observed
from ._norm import group_norm, make_group_norm
from ._scope import Scope


class ResnetBlock2D(Block):
    """The pre-activation residual block of the autoencoder:
    `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1x1 `conv_shortcut` on the
    skip path when the channel count changes.

    Called as `block(x, policy=...)` on `(in_channels, height, width)`; returns
    `(out_channels, height, width)`.
    """

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    conv_shortcut: eqx.nn.Conv2d | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    _checkpointed: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the input.
        - `out_channels`: channels of the output.
        - `norm_num_groups`: GroupNorm groups; must divide both channel counts.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        key1, key2, key3 = init.split_keys(key, 3)
        self.in_channels = in_channels
        self.out_channels = out_channels
        where = f"ResnetBlock2D({in_channels} -> {out_channels})"
        self.norm1 = make_group_norm(in_channels, norm_num_groups, dtype=dtype, where=where)
        self.conv1 = init.conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, key=key1)
        self.norm2 = make_group_norm(out_channels, norm_num_groups, dtype=dtype, where=where)
        self.conv2 = init.conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, key=key2)
        if in_channels == out_channels:
            self.conv_shortcut = None
        else:
            self.conv_shortcut = init.conv2d(in_channels, out_channels, 1, dtype=dtype, key=key3)

    def _compute(
        self, x: Float[Array, "h w {self.in_channels}"], scope: Scope
    ) -> tuple[Float[Array, "h w {self.out_channels}"], Observed]:
        h, seen1 = group_norm(self.norm1, x, scope.child("norm1"), silu=True)
        h = conv(self.conv1, h, scope)
        h, seen2 = group_norm(self.norm2, h, scope.child("norm2"), silu=True)
        h = conv(self.conv2, h, scope)
        skip = x if self.conv_shortcut is None else conv(self.conv_shortcut, x, scope)
        return skip.astype(h.dtype) + h, seen1 | seen2
