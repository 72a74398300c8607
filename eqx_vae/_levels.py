"""One level of the encoder or decoder: ResNet blocks, then a change of resolution."""

from typing import Any

import equinox as eqx

from ._block import SequentialBlock, Step, indexed_steps
from ._custom_types import DTypeLike, KeyArray
from ._init import split_keys
from ._resnet import ResnetBlock2D
from ._sampling import Downsample2D, Upsample2D


def _level(
    in_channels: int,
    out_channels: int,
    num_layers: int,
    norm_num_groups: int,
    sampler: type[Downsample2D] | type[Upsample2D] | None,
    dtype: DTypeLike | None,
    key: KeyArray,
) -> tuple[tuple[ResnetBlock2D, ...], tuple[Any, ...]]:
    """The ResNet blocks of a level (the first changes the channel count), and its
    resampler if any, from `num_layers + 1` keys."""
    keys = split_keys(key, num_layers + 1)
    resnets = tuple(
        ResnetBlock2D(
            in_channels if i == 0 else out_channels,
            out_channels,
            norm_num_groups,
            dtype,
            key=keys[i],
        )
        for i in range(num_layers)
    )
    samplers = () if sampler is None else (sampler(out_channels, dtype, key=keys[-1]),)
    return resnets, samplers


class DownEncoderBlock2D(SequentialBlock):
    """One encoder level: `num_layers` ResNet blocks, then (except on the last level) a
    [`eqx_vae.Downsample2D`][] in `downsamplers`.

    Called as `block(x, policy=...)` on `(in_channels, height, width)`; returns
    `(out_channels, height // 2, width // 2)`, or `(out_channels, height, width)`
    without a downsampler.
    """

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
        self.in_channels = in_channels
        self.out_channels = out_channels
        sampler = Downsample2D if add_downsample else None
        self.resnets, self.downsamplers = _level(
            in_channels, out_channels, num_layers, norm_num_groups, sampler, dtype, key
        )

    def _steps(self) -> tuple[Step, ...]:
        return (
            *indexed_steps("resnets", self.resnets),
            *indexed_steps("downsamplers", self.downsamplers),
        )


class UpDecoderBlock2D(SequentialBlock):
    """One decoder level: `num_layers` ResNet blocks, then (except on the last level) an
    [`eqx_vae.Upsample2D`][] in `upsamplers`.

    Called as `block(x, policy=...)` on `(in_channels, height, width)`; returns
    `(out_channels, 2 * height, 2 * width)`, or `(out_channels, height, width)` without
    an upsampler.
    """

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
        self.in_channels = in_channels
        self.out_channels = out_channels
        sampler = Upsample2D if add_upsample else None
        self.resnets, self.upsamplers = _level(
            in_channels, out_channels, num_layers, norm_num_groups, sampler, dtype, key
        )

    def _steps(self) -> tuple[Step, ...]:
        return (
            *indexed_steps("resnets", self.resnets),
            *indexed_steps("upsamplers", self.upsamplers),
        )
