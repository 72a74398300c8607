"""The loss terms of the KL autoencoder recipe (CompVis' `LPIPSWithDiscriminator`).

Images are unbatched `(C, H, W)` arrays unless said otherwise; reductions follow the
recipe: sums over channels, height and width, means over the batch (taken by the
caller, who vmaps).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def l1(x: Float[Array, "*shape"], y: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Elementwise absolute difference."""
    return jnp.abs(x - y)


def l2(x: Float[Array, "*shape"], y: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Elementwise squared difference."""
    return jnp.square(x - y)


def block_means(x: Float[Array, "*batch c h w"], size: int) -> Float[Array, "*batch c h2 w2"]:
    """Means over `size` by `size` blocks (rows and columns past the last whole block
    are left out)."""
    *batch, c, h, w = x.shape
    bh, bw = h // size, w // size
    x = x[..., : bh * size, : bw * size].reshape(*batch, c, bh, size, bw, size)
    return jnp.mean(x, axis=(-3, -1))


def on_pixels(
    x: Float[Array, "*batch c h2 w2"], size: int, h: int, w: int
) -> Float[Array, "*batch c h w"]:
    """Each block's value on each of its `size` by `size` pixels, zero past the last
    whole block, at `h` by `w`: the inverse layout of `block_means`."""
    x = jnp.repeat(jnp.repeat(x, size, axis=-2), size, axis=-1)
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, h - x.shape[-2]), (0, w - x.shape[-1])])


def nll_with_learned_logvar(
    reconstruction_error: Float[Array, "c h w"], logvar: Float[Array, ""]
) -> Float[Array, ""]:
    """`sum(error / exp(logvar) + logvar)` over channels, height and width: the
    reconstruction term of the recipe, with a learned scalar log-variance that balances
    it against the other terms."""
    return jnp.sum(reconstruction_error / jnp.exp(logvar) + logvar)


def hinge_d_loss(
    logits_real: Float[Array, "*batch"], logits_fake: Float[Array, "*batch"]
) -> Float[Array, ""]:
    """`0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))`."""
    return 0.5 * (
        jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )


def vanilla_d_loss(
    logits_real: Float[Array, "*batch"], logits_fake: Float[Array, "*batch"]
) -> Float[Array, ""]:
    """`0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))`."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_loss(logits_fake: Float[Array, "*batch"]) -> Float[Array, ""]:
    """`-mean(D(x_hat))`: the autoencoder's adversarial term."""
    return -jnp.mean(logits_fake)


def adaptive_weight(
    nll_grad: Float[Array, "*w"],
    generator_grad: Float[Array, "*w"],
    disc_weight: float,
    max_weight: float = 1e4,
) -> Float[Array, ""]:
    """The recipe's balance between the reconstruction and adversarial terms:
    `disc_weight * ||d nll / d w|| / (||d g / d w|| + 1e-4)`, clipped to
    `[0, max_weight]` before the factor, with `w` the decoder's last layer, and treated as a
    constant (no gradient flows through it)."""
    weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(generator_grad) + 1e-4)
    weight = jnp.clip(weight, 0.0, max_weight)
    return jax.lax.stop_gradient(weight * disc_weight)
