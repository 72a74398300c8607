"""What every block of the autoencoder shares: one public call, and a forward pass on
channels-last activations that the model, tiling, sharding and training all run.

A block's public `__call__` takes an unbatched channels-first array and a
[`eqx_vae.Policy`][]; it is written once, here. Inside, activations are channels-last
(the layout XLA's CPU convolutions are fastest in) and every block implements
`_compute(x, scope) -> (y, observed)`, where `scope` carries the policy and the block's
place in the module called, and `observed` holds GroupNorm input moments when tiling
asks for them (empty otherwise). Blocks that are a sequence of parts (levels, the mid
block, the encoder and decoder) list them as `_steps()`, which both their own forward
pass and tiling run, so that tiling cuts the model where its modules begin and end."""

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
from jaxtyping import Array, Float

from ._conv import conv
from ._custom_types import KeyArray, Observed
from ._halo import to_chw, to_hwc
from ._norm import group_norm
from ._policy import Policy
from ._remat import checkpoint
from ._scope import Scope


class Block(eqx.Module):
    """Base class of eqx_vae's blocks (`ResnetBlock2D`, `AttentionBlock`,
    `Downsample2D`, `Upsample2D`, `MidBlock2D`, `DownEncoderBlock2D`,
    `UpDecoderBlock2D`, `Encoder`, `Decoder`): each is called as
    `block(x, policy=...)`, and has `in_channels` and `out_channels` (fields or
    properties)."""

    # Whether `Policy(checkpoint=True)` recomputes this block's activations in the
    # backward pass (the blocks that hold the largest activations).
    _checkpointed: ClassVar[bool] = False
    # How the block changes the height and width (a sequential block: its steps').
    _scale: ClassVar[float] = 1.0
    # Whether an output pixel depends on the whole image, not only on nearby pixels and
    # GroupNorm statistics (tiling then runs the block whole).
    _whole_image: ClassVar[bool] = False

    def __call__(
        self,
        x: Float[Array, "{self.in_channels} h w"],
        *,
        policy: Policy | None = None,
        key: KeyArray | None = None,
    ) -> Float[Array, "{self.out_channels} h2 w2"]:
        """**Arguments:**

        - `x`: an unbatched feature map `(in_channels, height, width)`; use `jax.vmap`
            for batches.
        - `policy`: how to run: compute dtype, checkpointing, a sharded axis, ...; see
            [`eqx_vae.Policy`][]. The default runs in `x`'s dtype on one device.
        - `key`: ignored (no block is random); accepted for `eqx.nn.Sequential`.

        **Returns:**

        A feature map `(out_channels, height', width')`; its resolution is given in
        each block's description. Under a half-precision policy it is float32, the dtype
        of the activations between layers.
        """
        del key
        policy = Policy() if policy is None else policy
        y, _ = self._forward(to_hwc(x.astype(policy.stream_dtype(x.dtype))), Scope(policy))
        return to_chw(y)

    def _forward(self, x: Float[Array, "h w c"], scope: Scope) -> tuple[Array, Observed]:
        """The block's forward pass on a channels-last map: `_compute`, recomputed in the
        backward pass when the policy asks for checkpointing."""
        if self._checkpointed and scope.policy.checkpoint:
            return checkpoint(type(self)._compute)(self, x, scope.without_checkpoint())
        return self._compute(x, scope)

    @abc.abstractmethod
    def _compute(self, x: Float[Array, "h w c"], scope: Scope) -> tuple[Array, Observed]:
        raise NotImplementedError


class SameChannelsBlock(Block):
    """A block whose output has as many channels as its input, `channels`."""

    channels: eqx.AbstractVar[int]

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels


class Step(NamedTuple):
    """One part of a sequential forward pass: the attribute path of the part, the part
    itself (a block or an Equinox layer) and its forward pass."""

    place: str
    module: Any
    forward: Callable[[Array, Scope], tuple[Array, Observed]]


def block_step(place: str, block: Block) -> Step:
    return Step(place, block, block._forward)


def conv_step(place: str, layer: eqx.nn.Conv2d) -> Step:
    return Step(place, layer, lambda x, scope: (conv(layer, x, scope), {}))


def norm_silu_step(place: str, norm: eqx.nn.GroupNorm) -> Step:
    return Step(place, norm, lambda x, scope: group_norm(norm, x, scope, silu=True))


def run_steps(steps: Sequence[Step], x: Array, scope: Scope) -> tuple[Array, Observed]:
    """The steps one after the other, each under its own place."""
    observed: Observed = {}
    for step in steps:
        x, seen = step.forward(x, scope.child(step.place))
        observed.update(seen)
    return x, observed


class SequentialBlock(Block):
    """A block whose forward pass is its `_steps()` in order."""

    @abc.abstractmethod
    def _steps(self) -> tuple[Step, ...]:
        raise NotImplementedError

    def _compute(self, x: Float[Array, "h w c"], scope: Scope) -> tuple[Array, Observed]:
        return run_steps(self._steps(), x, scope)


def substeps(step: Step) -> tuple[Step, ...]:
    """The steps of a sequential block's step, under their places in the caller."""
    module = step.module
    if not isinstance(module, SequentialBlock):
        raise TypeError(f"{step.place} is not a sequential block.")
    return tuple(Step(f"{step.place}.{s.place}", s.module, s.forward) for s in module._steps())


def indexed_steps(place: str, blocks: Sequence[Block]) -> list[Step]:
    """The steps of a tuple field `place` of blocks: `place.0`, `place.1`, ..."""
    return [block_step(f"{place}.{i}", block) for i, block in enumerate(blocks)]
