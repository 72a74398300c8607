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
from ._levels import DownEncoderBlock2D
from ._mid_block import MidBlock2D
from ._norm import make_group_norm
from ._scope import Scope


class Encoder(SequentialBlock):
    """Maps an image to the moments (mean and log-variance, concatenated along the
    channels) of the latent posterior, before `quant_conv`: `conv_in`, the
    `down_blocks`, the `mid_block`, then `conv_norm_out` with SiLU and `conv_out`.

    Called as `encoder(x, policy=...)` on `(in_channels, height, width)`, height and
    width multiples of `spatial_factor`; returns the moments
    `(2 * latent_channels, height / f, width / f)`.
    """

    conv_in: eqx.nn.Conv2d
    down_blocks: tuple[DownEncoderBlock2D, ...]
    mid_block: MidBlock2D
    conv_norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    in_channels: int = eqx.field(static=True)
    latent_channels: int = eqx.field(static=True)
    spatial_factor: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the image.
        - `latent_channels`: channels of the latent; the output has twice as many.
        - `block_out_channels`: the width of each level.
        - `layers_per_block`: ResNet blocks per level.
        - `norm_num_groups`: GroupNorm groups.
        - `mid_block_add_attention`: whether the mid block has self-attention.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        levels = len(block_out_channels)
        k_in, k_mid, k_out, *k_blocks = init.split_keys(key, levels + 3)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.spatial_factor = 2 ** (levels - 1)
        self.conv_in = init.conv2d(
            in_channels, block_out_channels[0], 3, padding=1, dtype=dtype, key=k_in
        )
        self.down_blocks = tuple(
            DownEncoderBlock2D(
                block_out_channels[max(i - 1, 0)],
                block_out_channels[i],
                layers_per_block,
                norm_num_groups,
                add_downsample=i < levels - 1,
                dtype=dtype,
                key=k_blocks[i],
            )
            for i in range(levels)
        )
        last = block_out_channels[-1]
        self.mid_block = MidBlock2D(
            last, norm_num_groups, mid_block_add_attention, dtype, key=k_mid
        )
        self.conv_norm_out = make_group_norm(
            last, norm_num_groups, dtype=dtype, where="Encoder.conv_norm_out"
        )
        self.conv_out = init.conv2d(
            last, 2 * latent_channels, 3, padding=1, dtype=dtype, key=k_out
        )

    @property
    def out_channels(self) -> int:
        return 2 * self.latent_channels

    def _steps(self) -> tuple[Step, ...]:
        return (
            conv_step("conv_in", self.conv_in),
            *indexed_steps("down_blocks", self.down_blocks),
            block_step("mid_block", self.mid_block),
            norm_silu_step("conv_norm_out", self.conv_norm_out),
            conv_step("conv_out", self.conv_out),
        )

    def _compute(
        self, x: Float[Array, "h w {self.in_channels}"], scope: Scope
    ) -> tuple[
        Float[Array, "h//{self.spatial_factor} w//{self.spatial_factor} {self.out_channels}"],
        Observed,
    ]:
        return super()._compute(x, scope)
