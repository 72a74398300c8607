"""The KL recipe's losses on a batch, as functions a training loop of one's own can
call: the autoencoder's (reconstruction with a learned log-variance, KL, the adaptively
weighted adversarial term) and the discriminator's."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Key

from .._autoencoder import AutoencoderKL, posterior
from .._block import run_steps, substeps
from .._conv import conv
from .._custom_types import KeyArray
from .._distribution import DiagonalGaussian
from .._halo import to_chw
from .._metrics import psnr
from .._policy import Policy
from .._scope import Scope
from ._losses import (
    adaptive_weight,
    block_means,
    generator_loss,
    hinge_d_loss,
    l1,
    l2,
    nll_with_learned_logvar,
    on_pixels,
    vanilla_d_loss,
)
from ._lpips import LPIPS
from ._state import TrainConfig


Batch = Float[Array, "batch c h w"]


def reconstruct(
    vae: AutoencoderKL, images: Batch, keys: Key[Array, " batch"], policy: Policy
) -> tuple[DiagonalGaussian, Callable[[Array], Batch]]:
    """The posteriors of a batch and the reconstructions of posterior samples (one key
    per image), as a function of the weight of the decoder's last layer: everything
    before that layer is computed once, so that gradients with respect to that weight
    (the adaptive weight's) cost one layer, not the whole decoder."""
    policy = vae.resolve_policy(policy)
    scope = Scope(policy)
    *head, decoder = vae._decode_steps()
    *features_steps, last = (*head, *substeps(decoder))

    def one(image: Array, key: KeyArray) -> tuple[DiagonalGaussian, Array]:
        moments, _ = run_steps(vae._encode_steps(), vae._prepare(image, policy), scope)
        post = posterior(moments)
        features, _ = run_steps(features_steps, vae._prepare(post.sample(key), policy), scope)
        return post, features

    posteriors, features = jax.vmap(one)(images, keys)

    def output(weight: Array) -> Batch:
        layer = eqx.tree_at(lambda c: c.weight, last.module, weight)
        return jax.vmap(lambda f: to_chw(conv(layer, f, scope.child(last.place))))(features)

    return posteriors, output


def reconstruction_loss(
    images: Batch,
    recon: Batch,
    logvar: Float[Array, ""],
    config: TrainConfig,
    lpips: LPIPS | None = None,
) -> Float[Array, ""]:
    """The recipe's NLL: the per-pixel error (L1 or L2, plus `perceptual_weight` times
    LPIPS, plus `colour_weight` times the error of the block means) divided by
    `exp(logvar)`, plus `logvar`, summed over each image and averaged over the batch."""
    distance = l1 if config.reconstruction == "l1" else l2
    per_pixel = distance(images, recon)
    if config.colour_weight > 0:
        size = config.colour_block
        blocks = distance(block_means(images, size), block_means(recon, size))
        colour = on_pixels(blocks, size, images.shape[-2], images.shape[-1])
        per_pixel = per_pixel + config.colour_weight * colour
    if lpips is not None and config.perceptual_weight > 0:
        perceptual = jax.vmap(lpips)(images, recon)
        per_pixel = per_pixel + config.perceptual_weight * perceptual[:, None, None, None]
    return jnp.mean(jax.vmap(nll_with_learned_logvar, (0, None))(per_pixel, logvar))


def autoencoder_loss(
    vae: AutoencoderKL,
    logvar: Float[Array, ""],
    images: Batch,
    keys: Key[Array, " batch"],
    config: TrainConfig,
    *,
    disc: Any = None,
    disc_factor: Float[Array, ""] | float = 1.0,
    lpips: LPIPS | None = None,
) -> tuple[Float[Array, ""], tuple[dict[str, Array], Batch]]:
    """The autoencoder's loss on a batch: `reconstruction_loss + kl_weight * KL`, plus,
    with a discriminator, `disc_factor` times the adaptively weighted generator term
    (the weight from the gradients at `decoder.conv_out.weight`); all of it times
    `loss_area / (height * width)` when `config.loss_area` is set (the metrics `nll`
    and `kl` stay unscaled).

    **Returns:**

    `(loss, (metrics, reconstructions))`: differentiate with
    `eqx.filter_value_and_grad(..., has_aux=True)`.
    """
    policy = Policy(dtype=config.compute_dtype, checkpoint=config.checkpoint)
    posteriors, output = reconstruct(vae, images, keys, policy)
    weight = vae.decoder.conv_out.weight
    recon = output(weight)
    nll = reconstruction_loss(images, recon, logvar, config, lpips)
    kl = jnp.mean(posteriors.kl())
    total = nll + config.kl_weight * kl
    error = (l1 if config.reconstruction == "l1" else l2)(images, recon.astype(images.dtype))
    metrics = {
        "nll": nll,
        "kl": kl,
        "rec": jnp.mean(error),
        "psnr": jnp.mean(jax.vmap(psnr)(images, recon.astype(images.dtype))),
        "logvar": logvar,
    }
    if disc is not None:
        g = generator_loss(jax.vmap(disc)(recon))
        nll_grad = jax.grad(
            lambda w: reconstruction_loss(images, output(w), logvar, config, lpips)
        )(weight)
        g_grad = jax.grad(lambda w: generator_loss(jax.vmap(disc)(output(w))))(weight)
        d_weight = adaptive_weight(nll_grad, g_grad, config.disc_weight)
        total = total + d_weight * disc_factor * g
        metrics.update(g_loss=g, d_weight=d_weight)
    if config.loss_area is not None:
        total = total * (config.loss_area / (images.shape[-2] * images.shape[-1]))
    return total, (metrics, recon)


def discriminator_loss(
    disc: Any,
    images: Batch,
    recon: Batch,
    config: TrainConfig,
    disc_factor: Float[Array, ""] | float = 1.0,
) -> Float[Array, ""]:
    """The discriminator's loss on real images and (constant) reconstructions: hinge or
    vanilla, times `disc_factor`."""
    real = jax.vmap(disc)(images)
    fake = jax.vmap(disc)(jax.lax.stop_gradient(recon))
    loss = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss
    return disc_factor * loss(real, fake)
