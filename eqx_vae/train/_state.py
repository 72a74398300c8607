import dataclasses
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._autoencoder import AutoencoderKL
from .._custom_types import KeyArray
from ._discriminator import PatchDiscriminator


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of autoencoder training (the CompVis KL recipe by default,
    with its weights).

    - `reconstruction`: `"l1"` or `"l2"`, per pixel.
    - `perceptual_weight`: weight of LPIPS added to the per-pixel term (needs an
        `LPIPS` module with trained weights; 0 disables it).
    - `colour_weight`, `colour_block`: add `colour_weight` times the per-pixel error
        (L1 or L2, as `reconstruction`) of the images' means over `colour_block` by
        `colour_block` blocks, on each block's pixels. The per-pixel term already counts
        a block's mean error once among its detail; this term weighs the local colour
        more, which the detail otherwise drowns out (0, the default, disables it).
    - `kl_weight`: weight of the KL divergence to the standard normal.
    - `learn_logvar`: learn the scalar log-variance that divides the reconstruction term
        (`nll = rec / exp(logvar) + logvar`); otherwise it stays at `logvar_init`.
    - `disc_weight`, `disc_start`, `disc_loss`: the adversarial term, its adaptive
        weight's factor, the step it starts at, and the discriminator's loss
        (`"hinge"` or `"vanilla"`); `disc_weight=0` trains no discriminator.
    - `learning_rate`, `betas`: Adam's, for the autoencoder and the discriminator.
    - `warmup_steps`, `decay_steps`: a linear warm-up of the learning rate over the
        first `warmup_steps`, then, when `decay_steps` is set, a cosine decay to a tenth
        of it at step `decay_steps` (constant by default, as in the recipe).
    - `decoder_only`: train only the decoder (and `post_quant_conv`): the encoder, and
        so the latent space a diffusion model was trained on, stay fixed.
    - `ema_decay`: keep an exponential moving average of the autoencoder's weights.
    - `ema_warmup`: use `min(ema_decay, (1 + step) / (10 + step))` at each step, as
        diffusers' `EMAModel` does, so that the average forgets the initial weights
        early instead of after thousands of steps.
    - `accumulate`: split each batch into this many micro-batches, adding their
        gradients (memory of one micro-batch, result of the whole batch).
    - `checkpoint`: recompute block activations in the backward pass (less memory).
    - `compute_dtype`: the forward pass's compute dtype (see `AutoencoderKL.decode`).
    - `loss_area`: for batches of several crop sizes ([`eqx_vae.train.Alternating`][]):
        scale the autoencoder's loss by `loss_area / (height * width)`, so that every
        pixel weighs alike whatever the size of its crop. The recipe sums its terms over
        each image's pixels, so a batch of 128-pixel crops would otherwise weigh four
        times one of 64-pixel crops. At crops of `loss_area` pixels the recipe is
        unchanged; by default (`None`) nothing is scaled.
    """

    reconstruction: Literal["l1", "l2"] = "l1"
    perceptual_weight: float = 0.0
    colour_weight: float = 0.0
    colour_block: int = 8
    kl_weight: float = 1e-6
    learn_logvar: bool = True
    logvar_init: float = 0.0
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    learning_rate: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 0
    decay_steps: int | None = None
    decoder_only: bool = False
    ema_decay: float | None = None
    ema_warmup: bool = True
    accumulate: int = 1
    checkpoint: bool = False
    compute_dtype: str | None = None
    loss_area: int | None = None

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(
                f"`reconstruction` must be 'l1' or 'l2', got {self.reconstruction!r}."
            )
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"`disc_loss` must be 'hinge' or 'vanilla', got {self.disc_loss!r}.")
        if self.accumulate < 1:
            raise ValueError(f"`accumulate` must be at least 1, got {self.accumulate}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must lie in (0, 1), got {self.ema_decay}.")
        if self.warmup_steps < 0 or (
            self.decay_steps is not None and self.decay_steps <= self.warmup_steps
        ):
            raise ValueError(
                "Need `warmup_steps >= 0` and `decay_steps` (when set) after it, got "
                f"{self.warmup_steps} and {self.decay_steps}."
            )
        if self.colour_block < 1:
            raise ValueError(f"`colour_block` must be at least 1, got {self.colour_block}.")
        if self.loss_area is not None and self.loss_area < 1:
            raise ValueError(f"`loss_area` must be a positive pixel count, got {self.loss_area}.")
        for name in (
            "perceptual_weight",
            "colour_weight",
            "kl_weight",
            "disc_weight",
            "learning_rate",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must not be negative, got {getattr(self, name)}.")

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


class TrainState(eqx.Module):
    """Everything that changes during training, as one pytree: the autoencoder, the
    learned log-variance, the discriminator, both optimisers' states, the EMA weights
    and the step."""

    vae: AutoencoderKL
    logvar: Float[Array, ""]
    disc: PatchDiscriminator | None
    opt_vae: Any
    opt_disc: Any
    ema: AutoencoderKL | None
    step: Int[Array, ""]


def trainable(vae: AutoencoderKL, config: TrainConfig) -> Any:
    """A pytree of booleans over `(vae, logvar)`: which leaves the optimiser updates.

    Never FLUX.2's BatchNorm statistics (`vae.bn`): they are fixed numbers that define
    the latent space a diffusion model sees, not parameters, so no optimiser (nor its
    weight decay) ever receives them."""
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, vae)
    if spec.bn is not None:
        spec = eqx.tree_at(lambda m: m.bn, spec, jax.tree_util.tree_map(lambda _: False, spec.bn))
    if config.decoder_only:
        frozen = jax.tree_util.tree_map(lambda _: False, (spec.encoder, spec.quant_conv))
        spec = eqx.tree_at(
            lambda m: (m.encoder, m.quant_conv), spec, frozen, is_leaf=lambda x: x is None
        )
    return spec, config.learn_logvar


def init_state(
    vae: AutoencoderKL,
    config: TrainConfig,
    optimizers: tuple[Any, Any],
    *,
    key: KeyArray,
) -> TrainState:
    """The state at step 0: `vae` as given, a new discriminator (when the config has
    one), fresh optimiser states, the EMA equal to `vae`."""
    optimizer_vae, optimizer_disc = optimizers
    logvar = jnp.asarray(config.logvar_init, jnp.float32)
    params = eqx.filter((vae, logvar), trainable(vae, config))
    disc = None
    if config.uses_discriminator:
        disc = PatchDiscriminator(vae.out_channels, key=key)
    return TrainState(
        vae=vae,
        logvar=logvar,
        disc=disc,
        opt_vae=optimizer_vae.init(params),
        opt_disc=None
        if disc is None
        else optimizer_disc.init(eqx.filter(disc, eqx.is_inexact_array)),
        # A copy, not the same buffers: the step donates its input state.
        ema=jax.tree_util.tree_map(jnp.copy, vae) if config.ema_decay is not None else None,
        step=jnp.asarray(0, jnp.int32),
    )


def make_optimizers(config: TrainConfig) -> tuple[Any, Any]:
    """Adam for the autoencoder and for the discriminator, with the config's rate,
    schedule and betas (the recipe's (0.5, 0.9))."""
    import optax

    rate = config.learning_rate
    if config.decay_steps is not None:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, rate, config.warmup_steps, config.decay_steps, end_value=0.1 * rate
        )
    elif config.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, rate, config.warmup_steps)
    else:
        schedule = rate
    b1, b2 = config.betas
    return (optax.adam(schedule, b1=b1, b2=b2), optax.adam(schedule, b1=b1, b2=b2))
