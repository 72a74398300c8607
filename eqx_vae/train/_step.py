from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._autoencoder import AutoencoderKL
from .._conv import conv_hwc, to_chw, to_hwc
from .._custom_types import KeyArray
from .._distribution import DiagonalGaussian
from .._metrics import psnr
from ._losses import (
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    l1,
    l2,
    nll_with_learned_logvar,
    vanilla_d_loss,
)
from ._lpips import LPIPS
from ._state import TrainConfig, TrainState, trainable


Batch = Float[Array, "batch c h w"]


def make_train_step(
    config: TrainConfig,
    optimizers: tuple[Any, Any],
    lpips: LPIPS | None = None,
) -> Callable[[TrainState, Batch, KeyArray], tuple[TrainState, dict[str, Array]]]:
    """The training step of the recipe, to be compiled with `eqx.filter_jit`:
    one update of the autoencoder (reconstruction, KL and, from `disc_start` on, the
    adaptively weighted adversarial term) and one of the discriminator, on the same
    batch.

    **Arguments:**

    - `config`: the [`eqx_vae.train.TrainConfig`][].
    - `optimizers`: the optax optimisers of the autoencoder and the discriminator
        (see `make_optimizers`).
    - `lpips`: the perceptual metric, required when `config.perceptual_weight > 0`.

    **Returns:**

    `step(state, images, key) -> (state, metrics)` for a batch of images in `[-1, 1]`;
    `key` draws the posterior samples. Under `eqx.filter_jit` with the batch sharded
    over devices (`jax.sharding`) and the state replicated, it trains data-parallel.
    """
    if config.perceptual_weight > 0 and lpips is None:
        raise ValueError("`perceptual_weight > 0` needs an `lpips` module.")
    optimizer_vae, optimizer_disc = optimizers
    compute = None if config.compute_dtype is None else np.dtype(jnp.dtype(config.compute_dtype))

    def reconstruct(
        vae: AutoencoderKL, images: Batch, keys: Array
    ) -> tuple[DiagonalGaussian, Array, Callable]:
        """Posterior, the decoder's last features and a function from the last layer's
        weight to the reconstructions (for the adaptive weight's gradients)."""
        ctx = vae.context(compute).replace(checkpoint=config.checkpoint)

        def one(image: Array, key: KeyArray) -> tuple[DiagonalGaussian, Array]:
            moments = vae.encode_hwc(to_hwc(image), ctx)
            posterior = DiagonalGaussian.from_moments(to_chw(moments))
            z = to_hwc(posterior.sample(key)).astype(ctx.stream_dtype(image.dtype))
            if vae.post_quant_conv is not None:
                z = conv_hwc(vae.post_quant_conv, z, ctx)
            return posterior, vae.decoder.features_hwc(z, ctx)

        posterior, features = jax.vmap(one)(images, keys)
        conv_out = vae.decoder.conv_out

        def output(weight: Array) -> Array:
            layer = eqx.tree_at(lambda c: c.weight, conv_out, weight)
            return jax.vmap(lambda f: to_chw(conv_hwc(layer, f, ctx)))(features)

        return posterior, features, output

    def losses(
        params: tuple[AutoencoderKL, Array],
        static: Any,
        disc: Any,
        images: Batch,
        keys: Array,
        disc_factor: Array,
    ) -> tuple[Array, tuple[dict[str, Array], Array]]:
        vae, logvar = eqx.combine(params, static)
        posterior, _, output = reconstruct(vae, images, keys)
        weight = vae.decoder.conv_out.weight
        recon = output(weight)
        error = (l1 if config.reconstruction == "l1" else l2)(images, recon.astype(images.dtype))

        def nll_of(recon: Array) -> Array:
            per_pixel = (l1 if config.reconstruction == "l1" else l2)(images, recon)
            if lpips is not None and config.perceptual_weight > 0:
                perceptual = jax.vmap(lpips)(images, recon)
                per_pixel = per_pixel + config.perceptual_weight * perceptual[:, None, None, None]
            return jnp.mean(jax.vmap(nll_with_learned_logvar, (0, None))(per_pixel, logvar))

        nll = nll_of(recon)
        kl = jnp.mean(posterior.kl())
        total = nll + config.kl_weight * kl
        psnr_values = jax.vmap(psnr)(images, recon.astype(images.dtype))
        metrics = {
            "nll": nll,
            "kl": kl,
            "rec": jnp.mean(error),
            "psnr": jnp.mean(psnr_values),
            "logvar": logvar,
        }
        if disc is not None:

            def g_of(recon: Array) -> Array:
                return generator_loss(jax.vmap(disc)(recon))

            g = g_of(recon)
            nll_grad = jax.grad(lambda w: nll_of(output(w)))(weight)
            g_grad = jax.grad(lambda w: g_of(output(w)))(weight)
            d_weight = adaptive_weight(nll_grad, g_grad, config.disc_weight)
            total = total + d_weight * disc_factor * g
            metrics.update(g_loss=g, d_weight=d_weight)
        return total, (metrics, recon)

    grad_vae = eqx.filter_value_and_grad(losses, has_aux=True)

    def disc_loss(disc: Any, images: Batch, recon: Batch, disc_factor: Array) -> Array:
        real = jax.vmap(disc)(images)
        fake = jax.vmap(disc)(jax.lax.stop_gradient(recon))
        loss = hinge_d_loss if config.disc_loss == "hinge" else vanilla_d_loss
        return disc_factor * loss(real, fake)

    grad_disc = eqx.filter_value_and_grad(disc_loss)

    def step(
        state: TrainState, images: Batch, key: KeyArray
    ) -> tuple[TrainState, dict[str, Array]]:
        spec = trainable(state.vae, config)
        params, static = eqx.partition((state.vae, state.logvar), spec)
        disc_factor = (state.step >= config.disc_start).astype(jnp.float32)
        parts = config.accumulate
        if images.shape[0] % parts:
            raise ValueError(
                f"The batch of {images.shape[0]} does not split into `accumulate={parts}` "
                "equal micro-batches."
            )
        micro = images.reshape(parts, images.shape[0] // parts, *images.shape[1:])
        keys = jax.random.split(key, images.shape[0]).reshape(parts, -1)

        def accumulate(carry: Any, batch: tuple[Array, Array]) -> tuple[Any, tuple[Any, Array]]:
            grads_vae, grads_disc, totals = carry
            x, k = batch
            (loss, (metrics, recon)), g_vae = grad_vae(
                params, static, state.disc, x, k, disc_factor
            )
            grads_vae = jax.tree_util.tree_map(jnp.add, grads_vae, g_vae)
            metrics = {**metrics, "loss": loss}
            if state.disc is not None:
                d_loss, g_disc = grad_disc(state.disc, x, recon, disc_factor)
                grads_disc = jax.tree_util.tree_map(jnp.add, grads_disc, g_disc)
                metrics["d_loss"] = d_loss
            totals = jax.tree_util.tree_map(jnp.add, totals, metrics)
            return (grads_vae, grads_disc, totals), (None, recon)

        zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
        disc_params = eqx.filter(state.disc, eqx.is_inexact_array)
        probe = jax.eval_shape(
            lambda: grad_vae(params, static, state.disc, micro[0], keys[0], disc_factor)[0][1][0]
        )
        metric_zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in probe.items()}
        metric_zeros["loss"] = jnp.zeros((), jnp.float32)
        if state.disc is not None:
            metric_zeros["d_loss"] = jnp.zeros((), jnp.float32)
        carry = (zeros(params), zeros(disc_params), metric_zeros)
        # An unrolled loop, not `lax.scan`: inside `scan`/`while` bodies XLA's CPU backend
        # runs convolutions and their gradients through a generic kernel about 13x
        # slower. Compilation time grows with `accumulate` instead.
        for part in range(parts):
            carry, _ = accumulate(carry, (micro[part], keys[part]))
        grads_vae, grads_disc, totals = carry
        scale = 1.0 / parts
        grads_vae = jax.tree_util.tree_map(lambda g: g * scale, grads_vae)
        metrics = {k: v * scale for k, v in totals.items()}

        # optax mixes Python floats with its int32 step count, which a program running
        # under `jax_numpy_dtype_promotion="strict"` would refuse.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_vae = optimizer_vae.update(grads_vae, state.opt_vae, params)
            params = eqx.apply_updates(params, updates)
            vae, logvar = eqx.combine(params, static)
            disc, opt_disc = state.disc, state.opt_disc
            if disc is not None:
                grads_disc = jax.tree_util.tree_map(lambda g: g * scale, grads_disc)
                updates, opt_disc = optimizer_disc.update(grads_disc, opt_disc, disc_params)
                disc = eqx.apply_updates(disc, updates)
        ema = state.ema
        if ema is not None and config.ema_decay is not None:
            decay = jnp.asarray(config.ema_decay, jnp.float32)
            if config.ema_warmup:
                t = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))

            def average(e: Any, v: Any) -> Any:
                if not eqx.is_inexact_array(v):
                    return v
                d = decay.astype(e.dtype)
                return d * e + (1 - d) * v

            ema = jax.tree_util.tree_map(average, ema, vae)
        new = TrainState(
            vae=vae,
            logvar=logvar,
            disc=disc,
            opt_vae=opt_vae,
            opt_disc=opt_disc,
            ema=ema,
            step=state.step + 1,
        )
        return new, metrics

    return step
