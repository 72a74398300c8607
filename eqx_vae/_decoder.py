import equinox as eqx
import jax
from jaxtyping import Array, Float

from ._context import DEFAULT, Context
from ._conv import conv_hwc, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._mid_block import MidBlock2D
from ._norm import group_norm_hwc, make_group_norm
from ._resnet import ResnetBlock2D
from ._sampling import Upsample2D


class UpDecoderBlock2D(eqx.Module):
    """One decoder level: `num_layers` ResNet blocks, then (except on the last level) an
    [`eqx_vae.Upsample2D`][] in `upsamplers`."""

    resnets: tuple[ResnetBlock2D, ...]
    upsamplers: tuple[Upsample2D, ...]
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        norm_num_groups: int = 32,
        add_upsample: bool = True,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the input.
        - `out_channels`: channels of every ResNet block's output.
        - `num_layers`: the number of ResNet blocks.
        - `norm_num_groups`: GroupNorm groups.
        - `add_upsample`: whether the level ends by doubling the resolution.
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
        if add_upsample:
            self.upsamplers = (Upsample2D(out_channels, dtype, key=keys[-1]),)
        else:
            self.upsamplers = ()

    def __call__(
        self, x: Float[Array, "{self.in_channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.out_channels} h2 w2"]:
        """**Arguments:**

        - `x`: an unbatched feature map of shape `(in_channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An array of shape `(out_channels, 2 * height, 2 * width)`, or
        `(out_channels, height, width)` without an upsampler.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.in_channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h2 w2 {self.out_channels}"]:
        """The same computation on a channels-last feature map; see `Context`."""
        for resnet in self.resnets:
            x = resnet.call_hwc(x, ctx)
        for upsampler in self.upsamplers:
            x = upsampler.call_hwc(x, ctx)
        return x


class Decoder(eqx.Module):
    """Maps a latent (after `post_quant_conv`) to an image."""

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
        k_in, k_mid, k_out, *k_blocks = jax.random.split(key, levels + 3)
        self.latent_channels = latent_channels
        self.out_channels = out_channels
        self.spatial_factor = 2 ** (levels - 1)
        widths = tuple(reversed(block_out_channels))
        self.conv_in = eqx.nn.Conv2d(
            latent_channels, widths[0], 3, padding=1, dtype=dtype, key=k_in
        )
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
        self.conv_out = eqx.nn.Conv2d(
            widths[-1], out_channels, 3, padding=1, dtype=dtype, key=k_out
        )

    def __call__(
        self, z: Float[Array, "{self.latent_channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.out_channels} {self.spatial_factor}*h {self.spatial_factor}*w"]:
        """**Arguments:**

        - `z`: an unbatched latent of shape `(latent_channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An image of shape `(out_channels, height * f, width * f)`.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(z)))

    def call_hwc(
        self, z: Float[Array, "h w {self.latent_channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "{self.spatial_factor}*h {self.spatial_factor}*w {self.out_channels}"]:
        """The same computation on a channels-last latent; see `Context` for `ctx`."""
        return conv_hwc(self.conv_out, self.features_hwc(z, ctx), ctx)

    def features_hwc(
        self, z: Float[Array, "h w {self.latent_channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "{self.spatial_factor}*h {self.spatial_factor}*w c"]:
        """Everything but `conv_out`: the input of the last layer (after `conv_norm_out`
        and SiLU), as training needs it for the gradients at that layer."""
        x = self.latent_stage_hwc(z, ctx, output=False)
        for stage in range(self.num_upsampling_stages):
            x = self.upsampling_stage_hwc(stage, x, ctx, output=False)
        return x

    @property
    def num_upsampling_stages(self) -> int:
        return len(self.up_blocks) - 1

    def latent_stage_hwc(
        self,
        z: Float[Array, "h w {self.latent_channels}"],
        ctx: Context = DEFAULT,
        output: bool = True,
    ) -> Float[Array, "h w c"]:
        """Everything at the latent's resolution: `conv_in`, the mid block (with the
        attention that mixes all pixels) and the first up block's ResNet blocks (and,
        for a one-level model, the output layers; `output=False` stops before
        `conv_out`)."""
        x = self.mid_block.call_hwc(conv_hwc(self.conv_in, z, ctx), ctx)
        for resnet in self.up_blocks[0].resnets:
            x = resnet.call_hwc(x, ctx)
        if self.num_upsampling_stages == 0:
            return self._output(x, ctx, output)
        return x

    def upsampling_stage_hwc(
        self, stage: int, x: Float[Array, "h w c"], ctx: Context = DEFAULT, output: bool = True
    ) -> Float[Array, "2*h 2*w c2"]:
        """Stage `stage` of the resolution doublings: the previous up block's
        upsampler and this block's ResNet blocks (and, last, the output layers;
        `output=False` stops before `conv_out`). Local operations and GroupNorm only,
        so a stage can run tile by tile."""
        for upsampler in self.up_blocks[stage].upsamplers:
            x = upsampler.call_hwc(x, ctx)
        for resnet in self.up_blocks[stage + 1].resnets:
            x = resnet.call_hwc(x, ctx)
        if stage == self.num_upsampling_stages - 1:
            return self._output(x, ctx, output)
        return x

    def _output(self, x: Array, ctx: Context, output: bool) -> Array:
        x = group_norm_hwc(self.conv_norm_out, x, ctx, silu=True)
        return conv_hwc(self.conv_out, x, ctx) if output else x
