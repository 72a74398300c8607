import equinox as eqx
import jax
from jaxtyping import Array, Float

from ._context import DEFAULT, Context
from ._conv import conv_hwc, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._norm import group_norm_hwc, make_group_norm
from ._remat import checkpoint


class ResnetBlock2D(eqx.Module):
    """The pre-activation residual block of the autoencoder:
    `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1x1 `conv_shortcut` on the
    skip path when the channel count changes.
    """

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    conv_shortcut: eqx.nn.Conv2d | None
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)

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
        key1, key2, key3 = jax.random.split(key, 3)
        self.in_channels = in_channels
        self.out_channels = out_channels
        where = f"ResnetBlock2D({in_channels} -> {out_channels})"
        self.norm1 = make_group_norm(in_channels, norm_num_groups, dtype=dtype, where=where)
        self.conv1 = eqx.nn.Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, key=key1)
        self.norm2 = make_group_norm(out_channels, norm_num_groups, dtype=dtype, where=where)
        self.conv2 = eqx.nn.Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, key=key2)
        if in_channels == out_channels:
            self.conv_shortcut = None
        else:
            self.conv_shortcut = eqx.nn.Conv2d(in_channels, out_channels, 1, dtype=dtype, key=key3)

    def __call__(
        self, x: Float[Array, "{self.in_channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.out_channels} h w"]:
        """**Arguments:**

        - `x`: an unbatched image of shape `(in_channels, height, width)`.
        - `key`: ignored; accepted for compatibility with `eqx.nn.Sequential`.

        **Returns:**

        An array of shape `(out_channels, height, width)`.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.in_channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h w {self.out_channels}"]:
        """The same computation on a channels-last image; see `Context` for `ctx`."""
        if ctx.checkpoint:
            inner = ctx.replace(checkpoint=False)

            def call(block: "ResnetBlock2D", x: Array) -> Array:
                return block.call_hwc(x, inner)

            return checkpoint(call)(self, x)
        h = conv_hwc(self.conv1, group_norm_hwc(self.norm1, x, ctx, silu=True), ctx)
        h = conv_hwc(self.conv2, group_norm_hwc(self.norm2, h, ctx, silu=True), ctx)
        skip = x if self.conv_shortcut is None else conv_hwc(self.conv_shortcut, x, ctx)
        return skip.astype(h.dtype) + h
