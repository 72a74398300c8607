"""FLUX.2's latent normalisation: the running statistics of a BatchNorm over the
patchified latent, applied as an inference-mode BatchNorm."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._custom_types import DTypeLike, KeyArray
from ._precision import at_least_float32


class LatentBatchNorm(eqx.Module):
    """The running statistics of FLUX.2's latent BatchNorm (diffusers'
    `AutoencoderKLFlux2.bn`, a `BatchNorm2d(affine=False)`), and the normalisation
    they define: `(z - running_mean) / sqrt(running_var + eps)` per channel, as the
    BatchNorm computes in inference mode.

    The statistics are fixed numbers of a trained model, not parameters:
    [`eqx_vae.train.trainable`][] leaves them out of every optimiser update, and no
    gradient flows into them. `num_batches_tracked` is kept only so that checkpoints
    round-trip (diffusers stores it); `eps` and `momentum` are the config's
    `batch_norm_eps` and `batch_norm_momentum`.
    """

    running_mean: Float[Array, " channels"]
    running_var: Float[Array, " channels"]
    num_batches_tracked: Int[Array, ""]
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        eps: float = 1e-4,
        momentum: float = 0.1,
        dtype: DTypeLike | None = None,
    ):
        """**Arguments:**

        - `channels`: channels of the patchified latent (`latent_channels` times the
            pixels of a patch).
        - `eps`: added to the variance.
        - `momentum`: recorded for diffusers' config; never applied.
        - `dtype`: dtype of the statistics (float32 by default).

        The statistics start as PyTorch's do: mean 0, variance 1, no batches.
        """
        dtype = jnp.float32 if dtype is None else dtype
        self.running_mean = jnp.zeros((channels,), dtype)
        self.running_var = jnp.ones((channels,), dtype)
        self.num_batches_tracked = jnp.zeros((), jnp.int32)
        self.eps = eps
        self.momentum = momentum

    @property
    def channels(self) -> int:
        return self.running_mean.shape[0]

    def __call__(
        self, z: Float[Array, "*batch {self.channels} h w"], *, key: KeyArray | None = None
    ) -> Float[Array, "*batch {self.channels} h w"]:
        """Normalises a patchified latent (leading batch axes allowed); computed in at
        least float32, returned in `z`'s dtype. `key` is ignored."""
        del key
        mean, std = self._moments(z)
        wide = mean.dtype
        return ((z.astype(wide) - mean) / std).astype(z.dtype)

    def inverse(
        self, z: Float[Array, "*batch {self.channels} h w"]
    ) -> Float[Array, "*batch {self.channels} h w"]:
        """The inverse of `__call__`: `z * sqrt(running_var + eps) + running_mean`."""
        mean, std = self._moments(z)
        wide = mean.dtype
        return (z.astype(wide) * std + mean).astype(z.dtype)

    def _moments(self, z: Array) -> tuple[Array, Array]:
        """Mean and standard deviation shaped to broadcast against `(*batch, C, h, w)`.
        Statistics, not parameters: no gradient flows into them."""
        wide = at_least_float32(z.dtype)
        mean = jax.lax.stop_gradient(self.running_mean).astype(wide)
        var = jax.lax.stop_gradient(self.running_var).astype(wide)
        std = jnp.sqrt(var + jnp.asarray(self.eps, wide))
        shape = (1,) * (z.ndim - 3) + (self.channels, 1, 1)
        return mean.reshape(shape), std.reshape(shape)
