"""The statistics of a VAE's latents over a dataset, and the latent conventions of the
published pipelines that they give."""

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal, get_args

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._autoencoder import AutoencoderKL
from ._builtin import with_config
from ._custom_types import DTypeLike
from ._latents import patchify
from ._policy import Policy


Convention = Literal["scaling", "shift_scaling", "per_channel", "batch_norm"]
CONVENTIONS: tuple[Convention, ...] = get_args(Convention)


@dataclasses.dataclass(frozen=True)
class LatentStatistics:
    """The mean and standard deviation of a VAE's latents over a dataset, per latent
    channel and over all of them, as [`eqx_vae.latent_statistics`][] measures them.

    **Fields:**

    - `mean`, `std`: per latent channel, float64 arrays of shape `(latent_channels,)`;
        for FLUX.2 models per channel of the patchified latent the diffusion model sees,
        `(4 * latent_channels,)` (see `patch`).
    - `global_mean`, `global_std`: over every latent value.
    - `count`: how many latent values each channel's statistics are over.
    - `images`: how many images were encoded.
    - `patch`: the patch folded into the channels before measuring (`(2, 2)` for
        FLUX.2, whose BatchNorm normalises the patchified latent), or `None`.

    Standard deviations are the population ones (divided by the count), as `torch.std`
    with `correction=0` and `jnp.std` compute them.
    """

    mean: np.ndarray
    std: np.ndarray
    global_mean: float
    global_std: float
    count: int
    images: int
    patch: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready values (`from_dict` reads them back)."""
        return {
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "global_mean": self.global_mean,
            "global_std": self.global_std,
            "count": self.count,
            "images": self.images,
            "patch": None if self.patch is None else list(self.patch),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LatentStatistics":
        return cls(
            mean=np.asarray(values["mean"], np.float64),
            std=np.asarray(values["std"], np.float64),
            global_mean=float(values["global_mean"]),
            global_std=float(values["global_std"]),
            count=int(values["count"]),
            images=int(values["images"]),
            patch=None if values.get("patch") is None else tuple(values["patch"]),
        )

    def conventions(self) -> tuple[Convention, ...]:
        """The conventions these statistics can give: FLUX.2's BatchNorm for statistics
        of a patchified latent, the others otherwise."""
        if self.patch is not None:
            return ("batch_norm",)
        return tuple(c for c in CONVENTIONS if c != "batch_norm")

    def config_fields(self, convention: Convention, *, target_std: float = 1.0) -> dict[str, Any]:
        """The config fields that make the scaled latents (see
        [`eqx_vae.AutoencoderKL.scale_latents`][]) have standard deviation `target_std`
        under a family's convention.

        **Arguments:**

        - `convention`: one of
            - `"scaling"` (SD 1.x/2.x, SDXL): `scaling_factor = target_std / global_std`,
                no shift;
            - `"shift_scaling"` (SD3, FLUX.1): `shift_factor = global_mean`,
                `scaling_factor = target_std / global_std`;
            - `"per_channel"` (Playground v2.5): `latents_mean = mean`,
                `latents_std = std`, `scaling_factor = target_std`, so that every channel
                has mean 0 and standard deviation `target_std`.
            - `"batch_norm"` (FLUX.2): not config fields but the BatchNorm's
                `running_mean = mean` and `running_var = std**2` over the patchified
                latent; `target_std` must be 1.
        - `target_std`: the standard deviation the scaled latents should have (1 for the
            published SD and FLUX.1 factors; Playground v2.5 uses 0.5).

        **Returns:**

        A dict of [`eqx_vae.AutoencoderKLConfig`][] fields, to pass to its `replace`
        (for `"batch_norm"`, of the BatchNorm's statistics).
        """
        if not target_std > 0:
            raise ValueError(f"`target_std` must be positive, got {target_std}.")
        if (convention == "batch_norm") != (self.patch is not None):
            raise ValueError(
                "FLUX.2's batch_norm convention needs statistics of the "
                "patchified latent, which only FLUX.2 models measure, and FLUX.2 models "
                f"have no other; got {convention!r} for statistics with patch={self.patch}."
            )
        if convention == "batch_norm":
            if target_std != 1.0:
                raise ValueError("FLUX.2's BatchNorm normalises to standard deviation 1.")
            return dict(
                running_mean=tuple(float(m) for m in self.mean),
                running_var=tuple(float(s) ** 2 for s in self.std),
            )
        if convention == "scaling":
            scale = target_std / self.global_std
            return dict(
                scaling_factor=scale, shift_factor=None, latents_mean=None, latents_std=None
            )
        if convention == "shift_scaling":
            return dict(
                scaling_factor=target_std / self.global_std,
                shift_factor=self.global_mean,
                latents_mean=None,
                latents_std=None,
            )
        if convention == "per_channel":
            return dict(
                scaling_factor=float(target_std),
                shift_factor=None,
                latents_mean=tuple(float(m) for m in self.mean),
                latents_std=tuple(float(s) for s in self.std),
            )
        raise ValueError(f"Unknown `convention={convention!r}`; choose one of {CONVENTIONS}.")


def latent_statistics(
    model: AutoencoderKL,
    images: Iterable[Any],
    *,
    key: PRNGKeyArray | None = None,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
) -> LatentStatistics:
    """Measures the statistics of `model`'s latents over a dataset, streaming: one batch
    is encoded at a time (by a compiled program, once per batch shape), so memory is
    bounded by the batch, whatever the dataset's size.

    **Arguments:**

    - `model`: the [`eqx_vae.AutoencoderKL`][].
    - `images`: an iterable of batches, each an array `(batch, in_channels, height,
        width)` in `[-1, 1]` (NumPy or JAX; sizes may differ between batches), or one
        such array.
    - `key`: when given, the latents are samples of the posterior (as the latent
        diffusion models were trained on, and as the LDM code measured SD's
        `scaling_factor`), each batch with its own key folded in from this one; by
        default the posterior's mode (its mean), as FLUX pipelines encode.
    - `dtype`, `policy`: how to encode, as in [`eqx_vae.AutoencoderKL.encode`][].

    **Returns:**

    A [`eqx_vae.LatentStatistics`][]; `apply_latent_statistics` turns it into a family's
    latent convention.

    Per-batch moments are computed about the batch's own mean and merged in float64
    (Chan et al.'s pairwise update), so streaming gives the same statistics as one batch
    of everything, up to float32 rounding.
    """
    if isinstance(images, (np.ndarray, jax.Array)):
        images = [images]
    patch = model.config.patch_size
    moments = _batch_moments(policy, dtype, patch)
    count, mean, m2, n_images = 0, None, None, 0
    for index, batch in enumerate(images):
        batch = jnp.asarray(batch)
        if batch.ndim != 4:
            raise ValueError(
                "`images` must yield batches of shape (batch, channels, height, width), "
                f"got one of shape {tuple(batch.shape)}."
            )
        batch_key = None if key is None else jax.random.fold_in(key, index)
        batch_count, batch_mean, batch_m2 = jax.device_get(moments(model, batch, batch_key))
        batch_mean = np.asarray(batch_mean, np.float64)
        batch_m2 = np.asarray(batch_m2, np.float64)
        if mean is None or m2 is None:
            count, mean, m2 = batch_count, batch_mean, batch_m2
        else:
            total = count + batch_count
            delta = batch_mean - mean
            mean = mean + delta * (batch_count / total)
            m2 = m2 + batch_m2 + delta**2 * (count * batch_count / total)
            count = total
        n_images += batch.shape[0]
    if mean is None or m2 is None:
        raise ValueError("`images` yielded no batches.")
    global_mean = float(mean.mean())
    global_var = float(
        (m2.sum() + count * ((mean - global_mean) ** 2).sum()) / (count * mean.size)
    )
    return LatentStatistics(
        mean=mean,
        std=np.sqrt(m2 / count),
        global_mean=global_mean,
        global_std=float(np.sqrt(global_var)),
        count=int(count),
        images=n_images,
        patch=patch,
    )


def apply_latent_statistics(
    model: AutoencoderKL,
    stats: LatentStatistics,
    convention: Convention | None = None,
    *,
    target_std: float = 1.0,
) -> AutoencoderKL:
    """`model` with its latent convention set from measured statistics: its config's
    scaling fields, or for FLUX.2 its BatchNorm statistics.

    **Arguments:**

    - `model`: the [`eqx_vae.AutoencoderKL`][] the statistics were measured on.
    - `stats`: from [`eqx_vae.latent_statistics`][].
    - `convention`: see [`eqx_vae.LatentStatistics.config_fields`][]; by default the one
        `model` already follows (FLUX.2's BatchNorm, per-channel when the config has
        `latents_mean`, shift and scale when it has a `shift_factor`, else scale alone).
    - `target_std`: the standard deviation of the scaled latents.

    **Returns:**

    The same parameters under the updated config: `model.scale_latents(z)` of latents
    from the measured data has mean about 0 (about `-shift * scale` for `"scaling"`,
    which does not centre) and standard deviation `target_std`.
    """
    channels = model.config.scaled_latent_channels
    if stats.mean.shape != (channels,) or stats.patch != model.config.patch_size:
        raise ValueError(
            f"The statistics are of {stats.mean.shape[0]} latent channels (patch "
            f"{stats.patch}); the model has {channels} (patch {model.config.patch_size})."
        )
    if convention is None:
        convention = family_convention(model)
    fields = stats.config_fields(convention, target_std=target_std)
    if convention == "batch_norm":
        bn = model.bn
        assert bn is not None
        mean = jnp.asarray(fields["running_mean"], bn.running_mean.dtype)
        var = jnp.asarray(fields["running_var"], bn.running_var.dtype)
        return eqx.tree_at(lambda m: (m.bn.running_mean, m.bn.running_var), model, (mean, var))
    return with_config(model, model.config.replace(**fields))


def family_convention(model: AutoencoderKL) -> Convention:
    """The latent convention `model`'s config follows."""
    config = model.config
    if config.patch_size is not None:
        return "batch_norm"
    if config.latents_mean is not None and config.latents_std is not None:
        return "per_channel"
    if config.shift_factor is not None:
        return "shift_scaling"
    return "scaling"


def _batch_moments(
    policy: Policy | None, dtype: DTypeLike | None, patch: tuple[int, int] | None
) -> Any:
    """A compiled function of `(model, images, key)` to the batch's per-channel count,
    mean and sum of squared deviations from that mean (of the patchified latent, with
    `patch`)."""

    @eqx.filter_jit
    def moments(
        model: AutoencoderKL,
        images: Float[Array, "b c h w"],
        key: PRNGKeyArray | None,
    ) -> tuple[int, Array, Array]:
        def latent(x: Array, k: Any) -> Array:
            posterior = model.encode(x, dtype=dtype, policy=policy)
            z = posterior.mode() if k is None else posterior.sample(k)
            if patch is not None:
                z = patchify(z, patch)
            return z.astype(jnp.float32)

        keys = None if key is None else jax.random.split(key, images.shape[0])
        z = jax.vmap(latent)(images, keys)  # (b, c, h, w)
        count = z.shape[0] * z.shape[2] * z.shape[3]
        mean = jnp.mean(z, axis=(0, 2, 3))
        m2 = jnp.sum(jnp.square(z - mean[None, :, None, None]), axis=(0, 2, 3))
        return count, mean, m2

    return moments
