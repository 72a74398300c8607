import equinox as eqx

from ._attention import AttentionBlock
from ._block import SameChannelsBlock, SequentialBlock, Step, indexed_steps
from ._custom_types import DTypeLike, KeyArray
from ._init import split_keys
from ._resnet import ResnetBlock2D


class MidBlock2D(SequentialBlock, SameChannelsBlock):
    """The block at the lowest resolution: ResNet block, self-attention, ResNet block.

    With `add_attention=False` the attention is left out (`attentions` is empty).
    Called as `block(x, policy=...)` on `(channels, height, width)`; returns the same
    shape.
    """

    resnets: tuple[ResnetBlock2D, ResnetBlock2D]
    attentions: tuple[AttentionBlock, ...]
    channels: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        norm_num_groups: int = 32,
        add_attention: bool = True,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `channels`: channels of the input and the output.
        - `norm_num_groups`: GroupNorm groups; must divide `channels`.
        - `add_attention`: whether the self-attention layer exists.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the initialisation.
        """
        k1, k2, k3 = split_keys(key, 3)
        self.channels = channels
        self.resnets = (
            ResnetBlock2D(channels, channels, norm_num_groups, dtype, key=k1),
            ResnetBlock2D(channels, channels, norm_num_groups, dtype, key=k2),
        )
        if add_attention:
            self.attentions = (AttentionBlock(channels, norm_num_groups, dtype, key=k3),)
        else:
            self.attentions = ()

    def _steps(self) -> tuple[Step, ...]:
        resnets = indexed_steps("resnets", self.resnets)
        return (resnets[0], *indexed_steps("attentions", self.attentions), resnets[1])
