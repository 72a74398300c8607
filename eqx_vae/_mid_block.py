import equinox as eqx
import jax
from jaxtyping import Array, Float

from ._attention import AttentionBlock
from ._context import DEFAULT, Context
from ._conv import to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._resnet import ResnetBlock2D


class MidBlock2D(eqx.Module):
    """The block at the lowest resolution: ResNet block, self-attention, ResNet block.

    With `add_attention=False` the attention is left out (`attentions` is empty).
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
        k1, k2, k3 = jax.random.split(key, 3)
        self.channels = channels
        self.resnets = (
            ResnetBlock2D(channels, channels, norm_num_groups, dtype, key=k1),
            ResnetBlock2D(channels, channels, norm_num_groups, dtype, key=k2),
        )
        if add_attention:
            self.attentions = (AttentionBlock(channels, norm_num_groups, dtype, key=k3),)
        else:
            self.attentions = ()

    def __call__(
        self, x: Float[Array, "{self.channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "{self.channels} h w"]:
        """**Arguments:**

        - `x`: an unbatched feature map of shape `(channels, height, width)`.
        - `key`: ignored.

        **Returns:**

        An array of the same shape.
        """
        del key
        return to_chw(self.call_hwc(to_hwc(x)))

    def call_hwc(
        self, x: Float[Array, "h w {self.channels}"], ctx: Context = DEFAULT
    ) -> Float[Array, "h w {self.channels}"]:
        """The same computation on a channels-last feature map; see `Context`."""
        x = self.resnets[0].call_hwc(x, ctx)
        for attention in self.attentions:
            x = attention.call_hwc(x, ctx)
        return self.resnets[1].call_hwc(x, ctx)
