import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._custom_types import DTypeLike, KeyArray


class PatchDiscriminator(eqx.Module):
    """The PatchGAN discriminator of the recipe: a 4x4 convolution with stride 2 from
    the image to `channels`, then `num_layers` 4x4 convolutions doubling the channels
    (stride 2, the last stride 1), each followed by a normalisation and LeakyReLU(0.2),
    and a 4x4 convolution to one logit per patch.

    The original uses BatchNorm, which carries running statistics between steps;
    here each normalisation is a GroupNorm, a function of the image alone, so the
    discriminator is an ordinary pytree and vmaps like one.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[eqx.nn.GroupNorm, ...]
    in_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        num_layers: int = 3,
        norm_num_groups: int = 32,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `in_channels`: channels of the images.
        - `channels`: width of the first layer.
        - `num_layers`: the normalised layers after the first.
        - `norm_num_groups`: GroupNorm groups.
        - `dtype`: parameter dtype.
        - `key`: a JAX PRNG key; weights are drawn from N(0, 0.02) as in the recipe.
        """
        layers = num_layers + 2
        keys, weight_keys = jnp.split(jax.random.split(key, 2 * layers), 2)
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        convs = [
            eqx.nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1, dtype=dtype, key=keys[0])
        ]
        norms = []
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            convs.append(
                eqx.nn.Conv2d(
                    widths[i - 1],
                    widths[i],
                    4,
                    stride=stride,
                    padding=1,
                    use_bias=False,
                    dtype=dtype,
                    key=keys[i],
                )
            )
            norms.append(eqx.nn.GroupNorm(min(norm_num_groups, widths[i]), widths[i], dtype=dtype))
        convs.append(
            eqx.nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1, dtype=dtype, key=keys[-1])
        )
        # N(0, 0.02) weights, zero biases.
        convs = [
            eqx.tree_at(
                lambda c: c.weight, c, 0.02 * jax.random.normal(k, c.weight.shape, c.weight.dtype)
            )
            for c, k in zip(convs, weight_keys, strict=True)
        ]
        convs = [
            c if c.bias is None else eqx.tree_at(lambda c: c.bias, c, jnp.zeros_like(c.bias))
            for c in convs
        ]
        self.convs = tuple(convs)
        self.norms = tuple(norms)
        self.in_channels = in_channels

    def __call__(self, x: Float[Array, "{self.in_channels} h w"]) -> Float[Array, "1 h2 w2"]:
        """The logits of every patch of an unbatched image."""
        size = x.shape[1:]
        x = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:-1], self.norms, strict=True):
            x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
        x = self.convs[-1](x)
        if 0 in x.shape:
            raise ValueError(
                f"Images of {size[0]}x{size[1]} pixels are too small for the discriminator's "
                f"{len(self.convs)} layers (32x32 is the least for the default three)."
            )
        return x
