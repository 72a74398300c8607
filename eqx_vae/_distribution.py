import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import KeyArray


# The range diffusers and CompVis clamp the log-variance to.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian(eqx.Module):
    """The latent posterior: a Gaussian with diagonal covariance.

    A pytree, so it can be returned from `eqx.filter_jit` and mapped over with
    `jax.vmap`. The last three axes are `(channels, height, width)`; any leading axes
    are batch axes, and the reductions in `kl` and `nll` keep them, like diffusers'
    per-sample reductions.

    !!! Example

        ```python
        posterior = model.encode(image)
        z = posterior.sample(jax.random.key(0))  # or posterior.mode()
        ```
    """

    mean: Float[Array, "*batch c h w"]
    logvar: Float[Array, "*batch c h w"]

    def __init__(
        self, mean: Float[ArrayLike, "*batch c h w"], logvar: Float[ArrayLike, "*batch c h w"]
    ):
        """**Arguments:**

        - `mean`: the mean.
        - `logvar`: the log-variance, clamped to `[-30, 20]` as in diffusers.
        """
        mean = jnp.asarray(mean)
        logvar = jnp.asarray(logvar)
        if mean.shape != logvar.shape:
            raise ValueError(
                f"`mean` and `logvar` must have the same shape, got {mean.shape} and "
                f"{logvar.shape}."
            )
        self.mean = mean
        self.logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @classmethod
    def from_moments(cls, moments: Float[Array, "*batch two_c h w"]) -> "DiagonalGaussian":
        """Splits encoder moments `(2 * C, H, W)` into the mean (first `C` channels) and
        the log-variance (last `C`)."""
        channels = moments.shape[-3]
        if channels % 2 != 0:
            raise ValueError(
                f"Moments need an even number of channels (mean and log-variance), got {channels}."
            )
        mean, logvar = jnp.split(moments, 2, axis=-3)
        return cls(mean, logvar)

    @property
    def std(self) -> Float[Array, "*batch c h w"]:
        """The standard deviation, `exp(logvar / 2)`."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Float[Array, "*batch c h w"]:
        """The variance, `exp(logvar)`."""
        return jnp.exp(self.logvar)

    def sample(self, key: KeyArray) -> Float[Array, "*batch c h w"]:
        """Draws `mean + std * eps` with standard normal `eps` from `key`."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Float[Array, "*batch c h w"]:
        """The most likely latent, which is the mean."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> Float[Array, "*batch"]:
        """KL divergence to `other`, or to the standard normal when `other` is `None`,
        summed over channels, height and width."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=(-3, -2, -1))

    def nll(self, x: Float[Array, "*batch c h w"]) -> Float[Array, "*batch"]:
        """Negative log-likelihood of `x`, summed over channels, height and width."""
        terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(x - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=(-3, -2, -1))
