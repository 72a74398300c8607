"""The training step, from named parts: the recipe's losses (`_recipe`), micro-batch
accumulation, the optimiser updates and the EMA of the weights."""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Key

from .._autoencoder import AutoencoderKL
from .._custom_types import KeyArray
from ._lpips import LPIPS
from ._recipe import Batch, autoencoder_loss, discriminator_loss
from ._state import TrainConfig, TrainState, trainable


Tree = TypeVar("Tree")


def accumulate_gradients(
    fn: Callable[[Batch, Key[Array, " micro"]], Tree],
    images: Batch,
    keys: Key[Array, " batch"],
    parts: int,
) -> Tree:
    """The mean of `fn(micro_batch, micro_keys)` (any pytree of arrays: gradients,
    metrics) over `parts` equal micro-batches of `images` and their keys: the result of
    the whole batch in the memory of one micro-batch.

    An unrolled loop, not `lax.scan`: inside `scan`/`while` bodies XLA's CPU backend runs
    convolutions and their gradients through a generic kernel about 13x slower.
    Compilation time grows with `parts` instead.
    """
    if images.shape[0] % parts:
        raise ValueError(
            f"The batch of {images.shape[0]} does not split into `accumulate={parts}` "
            "equal micro-batches."
        )
    micro = images.reshape(parts, images.shape[0] // parts, *images.shape[1:])
    micro_keys = keys.reshape(parts, -1)
    total = None
    for part in range(parts):
        out = fn(micro[part], micro_keys[part])
        total = out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
    scale = 1.0 / parts
    return jax.tree_util.tree_map(lambda t: t * scale, total)


def apply_optimizer(optimizer: Any, grads: Tree, opt_state: Any, params: Tree) -> tuple[Tree, Any]:
    """One optax update of `params` (a filtered pytree, as `eqx.filter` gives)."""
    # optax mixes Python floats with its int32 step count, which a program running
    # under `jax_numpy_dtype_promotion="strict"` would refuse.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state


def update_ema(
    ema: AutoencoderKL, vae: AutoencoderKL, step: Array, decay: float, warmup: bool = True
) -> AutoencoderKL:
    """The exponential moving average after `step`: `d * ema + (1 - d) * vae` with
    `d = decay`, or with `warmup` `min(decay, (1 + step) / (10 + step))`, as diffusers'
    `EMAModel` does. FLUX.2's BatchNorm statistics are not averaged: they are `vae`'s,
    bit for bit."""
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
        t = step.astype(jnp.float32)
        d = jnp.minimum(d, (1.0 + t) / (10.0 + t))

    def average(e: Any, v: Any) -> Any:
        if not eqx.is_inexact_array(v):
            return v
        w = d.astype(e.dtype)
        return w * e + (1 - w) * v

    averaged = jax.tree_util.tree_map(average, ema, vae)
    if vae.bn is None:
        return averaged
    return eqx.tree_at(lambda m: m.bn, averaged, vae.bn)


def make_train_step(
    config: TrainConfig,
    optimizers: tuple[Any, Any],
    lpips: LPIPS | None = None,
) -> Callable[[TrainState, Batch, KeyArray], tuple[TrainState, dict[str, Array]]]:
    """The training step of the recipe, to be compiled with `eqx.filter_jit`:
    one update of the autoencoder (`autoencoder_loss`) and one of the discriminator
    (`discriminator_loss`), on the same batch, with gradients accumulated over
    `config.accumulate` micro-batches and the EMA updated.

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

    def vae_loss(params, static, disc, images, keys, disc_factor):
        vae, logvar = eqx.combine(params, static)
        return autoencoder_loss(
            vae, logvar, images, keys, config, disc=disc, disc_factor=disc_factor, lpips=lpips
        )

    grad_vae = eqx.filter_value_and_grad(vae_loss, has_aux=True)
    grad_disc = eqx.filter_value_and_grad(discriminator_loss)

    def step(
        state: TrainState, images: Batch, key: KeyArray
    ) -> tuple[TrainState, dict[str, Array]]:
        params, static = eqx.partition((state.vae, state.logvar), trainable(state.vae, config))
        disc_factor = (state.step >= config.disc_start).astype(jnp.float32)

        def gradients(
            batch: Batch, keys: Key[Array, " batch"]
        ) -> tuple[Any, Any, dict[str, Array]]:
            (loss, (metrics, recon)), g_vae = grad_vae(
                params, static, state.disc, batch, keys, disc_factor
            )
            metrics = {**metrics, "loss": loss}
            if state.disc is None:
                return g_vae, None, metrics
            d_loss, g_disc = grad_disc(state.disc, batch, recon, config, disc_factor)
            return g_vae, g_disc, {**metrics, "d_loss": d_loss}

        keys = jax.random.split(key, images.shape[0])
        grads_vae, grads_disc, metrics = accumulate_gradients(
            gradients, images, keys, config.accumulate
        )
        new = _updated(state, params, static, grads_vae, grads_disc, optimizers, config)
        return new, metrics

    return step


def _updated(
    state: TrainState,
    params: Any,
    static: Any,
    grads_vae: Any,
    grads_disc: Any,
    optimizers: tuple[Any, Any],
    config: TrainConfig,
) -> TrainState:
    """The state after one optimiser update of each network and of the EMA."""
    optimizer_vae, optimizer_disc = optimizers
    params, opt_vae = apply_optimizer(optimizer_vae, grads_vae, state.opt_vae, params)
    vae, logvar = eqx.combine(params, static)
    disc, opt_disc = state.disc, state.opt_disc
    if disc is not None:
        disc_params = eqx.filter(disc, eqx.is_inexact_array)
        disc_params, opt_disc = apply_optimizer(optimizer_disc, grads_disc, opt_disc, disc_params)
        disc = eqx.combine(disc_params, disc)
    ema = state.ema
    if ema is not None and config.ema_decay is not None:
        ema = update_ema(ema, vae, state.step, config.ema_decay, config.ema_warmup)
    return TrainState(
        vae=vae,
        logvar=logvar,
        disc=disc,
        opt_vae=opt_vae,
        opt_disc=opt_disc,
        ema=ema,
        step=state.step + 1,
    )
