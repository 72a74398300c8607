import equinox as eqx
import jax
from jaxtyping import Array, Float

from ._context import DEFAULT, Context
from ._conv import conv_hwc, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._mid_block import MidBlock2D
from ._norm import group_norm_hwc, make_group_norm
from ._resnet import ResnetBlock2D
from ._sampling import Downsample2D


class DownEncoderBlock2D(eqx.Module):
    """One encoder level: `num_layers` ResNet blocks, then (except on the last level) a
    [`eqx_vae.Downsample2D`][] in `downsamplers`."""

    resnets: tuple[ResnetBlock2D, ...]
    downsamplers: tuple[Downsample2D, ...]
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        norm_num_groups: int = 32,
        add_downsample: bool = True,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the input.
        - `out_channels`: channels of every ResNet block's output.
        - `num_layers`: the number of ResNet blocks.
        - `norm_num_groups`: GroupNorm groups.
        - `add_downsample`: whether the level ends by halving the resolution.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        keys = jax.random.split(key, num_layers + 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resnets = tuple(
            ResnetBlock2D(
                in_channels if i == 0 else out_channels,
                out_channels,
                norm_num_groups,
                dtype,
                key=keys[i],
            )
            for i in range(num_layers)
        )
        if add_downsample:
            self.downsamplers = (Downsample2D(out_channels, dtype, key=keys[-1]),)
        else:
            self.downsamplers = ()

    def __call__(
        self, x: Float[Array, "{self.in_channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.out_channels} h2 w2"]:
        """**Arguments:**

        - `x`: an unbatched feature map of shape `(in_channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An array of shape `(out_channels, height // 2, width // 2)`, or
        `(out_channels, height, width)` without a downsampler.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.in_channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h2 w2 {self.out_channels}"]:
        """The same computation on a channels-last feature map; see `Context`."""
        for resnet in self.resnets:
            x = resnet.call_hwc(x, ctx)
        for downsampler in self.downsamplers:
            x = downsampler.call_hwc(x, ctx)
        return x


class Encoder(eqx.Module):
    """Maps an image to the moments (mean and log-variance, concatenated along the
    channels) of the latent posterior, before `quant_conv`."""

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
        k_in, k_mid, k_out, *k_blocks = jax.random.split(key, levels + 3)
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.spatial_factor = 2 ** (levels - 1)
        self.conv_in = eqx.nn.Conv2d(
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
        self.conv_out = eqx.nn.Conv2d(
            last, 2 * latent_channels, 3, padding=1, dtype=dtype, key=k_out
        )

    def __call__(
        self, x: Float[Array, "{self.in_channels} h w"], *, key: KeyArray | None = None
    ) -> Float[
        Array, "{2*self.latent_channels} h//{self.spatial_factor} w//{self.spatial_factor}"
    ]:
        """**Arguments:**

        - `x`: an unbatched image of shape `(in_channels, height, width)`, height and
            width multiples of `spatial_factor`.
        - `key`: ignored.

        **Returns:**

        The moments, of shape `(2 * latent_channels, height / f, width / f)`.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.in_channels}"], ctx: Context = DEFAULT
    ) -> Float[
        Array, "h//{self.spatial_factor} w//{self.spatial_factor} {2*self.latent_channels}"
    ]:
        """The same computation on a channels-last image; see `Context` for `ctx`."""
        for stage in range(self.num_downsampling_stages):
            x = self.downsampling_stage_hwc(stage, x, ctx)
        return self.latent_stage_hwc(x, ctx)

    @property
    def num_downsampling_stages(self) -> int:
        return len(self.down_blocks) - 1

    def downsampling_stage_hwc(
        self, stage: int, x: Float[Array, "h w c"], ctx: Context = DEFAULT
    ) -> Float[Array, "h//2 w//2 c2"]:
        """Stage `stage` of the resolution halvings: (first `conv_in`, then) a down
        block's ResNet blocks and its downsampler. Local operations and GroupNorm only,
        so a stage can run tile by tile."""
        if stage == 0:
            x = conv_hwc(self.conv_in, x, ctx)
        return self.down_blocks[stage].call_hwc(x, ctx)

    def latent_stage_hwc(
        self, x: Float[Array, "h w c"], ctx: Context = DEFAULT
    ) -> Float[Array, "h w {2*self.latent_channels}"]:
        """Everything at the latent's resolution: the last down block, the mid block
        (with the attention that mixes all pixels) and the output layers."""
        if self.num_downsampling_stages == 0:
            x = conv_hwc(self.conv_in, x, ctx)
        x = self.down_blocks[-1].call_hwc(x, ctx)
        x = self.mid_block.call_hwc(x, ctx)
        return conv_hwc(self.conv_out, group_norm_hwc(self.conv_norm_out, x, ctx, silu=True), ctx)
