import equinox as eqx
from jaxtyping import Array, Float

from . import _init as init
from ._block import (
    SequentialBlock,
    Step,
    block_step,
    conv_step,
    indexed_steps,
    norm_silu_step,
)
from ._custom_types import DTypeLike, KeyArray, Observed
from ._levels import UpDecoderBlock2D
from ._mid_block import MidBlock2D
from ._norm import make_group_norm
from ._scope import Scope


class Decoder(SequentialBlock):
    """Maps a latent (after `post_quant_conv`) to an image: `conv_in`, the `mid_block`,
    the `up_blocks`, then `conv_norm_out` with SiLU and `conv_out`.

    Called as `decoder(z, policy=...)` on `(latent_channels, height, width)`; returns
    an image `(out_channels, height * f, width * f)`, `f` the `spatial_factor`.
    """

    conv_in: eqx.nn.Conv2d
    mid_block: MidBlock2D
    up_blocks: tuple[UpDecoderBlock2D, ...]
    conv_norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    latent_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    spatial_factor: int = eqx.field(static=True)

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `latent_channels`: channels of the latent.
        - `out_channels`: channels of the image.
        - `block_out_channels`: the width of each level, from the image side (the
            decoder walks it in reverse).
        - `layers_per_block`: the decoder has `layers_per_block + 1` ResNet blocks per
            level.
        - `norm_num_groups`: GroupNorm groups.
        - `mid_block_add_attention`: whether the mid block has self-attention.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        levels = len(block_out_channels)
        k_in, k_mid, k_out, *k_blocks = init.split_keys(key, levels + 3)
        self.latent_channels = latent_channels
        self.out_channels = out_channels
        self.spatial_factor = 2 ** (levels - 1)
        widths = tuple(reversed(block_out_channels))
        self.conv_in = init.conv2d(latent_channels, widths[0], 3, padding=1, dtype=dtype, key=k_in)
        self.mid_block = MidBlock2D(
            widths[0], norm_num_groups, mid_block_add_attention, dtype, key=k_mid
        )
        self.up_blocks = tuple(
            UpDecoderBlock2D(
                widths[max(i - 1, 0)],
                widths[i],
                layers_per_block + 1,
                norm_num_groups,
                add_upsample=i < levels - 1,
                dtype=dtype,
                key=k_blocks[i],
            )
            for i in range(levels)
        )
        self.conv_norm_out = make_group_norm(
            widths[-1], norm_num_groups, dtype=dtype, where="Decoder.conv_norm_out"
        )
        self.conv_out = init.conv2d(widths[-1], out_channels, 3, padding=1, dtype=dtype, key=k_out)

    @property
    def in_channels(self) -> int:
        return self.latent_channels

    def _steps(self) -> tuple[Step, ...]:
        return (
            conv_step("conv_in", self.conv_in),
            block_step("mid_block", self.mid_block),
            *indexed_steps("up_blocks", self.up_blocks),
            norm_silu_step("conv_norm_out", self.conv_norm_out),
            conv_step("conv_out", self.conv_out),
        )

    def _compute(
        self, x: Float[Array, "h w {self.latent_channels}"], scope: Scope
    ) -> tuple[
        Float[Array, "{self.spatial_factor}*h {self.spatial_factor}*w {self.out_channels}"],
        Observed,
    ]:
        return super()._compute(x, scope)
