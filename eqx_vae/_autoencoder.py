from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._config import AutoencoderKLConfig
from ._context import Context, resolve_compute_dtype
from ._conv import conv_hwc, to_chw, to_hwc
from ._custom_types import DTypeLike, KeyArray
from ._decoder import Decoder
from ._distribution import DiagonalGaussian
from ._encoder import Encoder
from ._init import default_init


class AutoencoderKL(eqx.Module):
    """The KL autoencoder of latent diffusion (Stable Diffusion 1.x/2.x, SDXL, SD3,
    FLUX.1), with the structure and parameter names of diffusers' `AutoencoderKL`.

    Every method is unbatched: images are `(channels, height, width)`; use `jax.vmap`
    for batches. Images are in `[-1, 1]`.

    !!! Example

        ```python
        config = eqx_vae.AutoencoderKLConfig.sd15()
        model = eqx_vae.AutoencoderKL.from_config(config, key=jax.random.key(0))
        posterior = jax.vmap(model.encode)(images)          # images: (B, 3, H, W)
        z = model.scale_latents(posterior.mode())           # what a diffusion model sees
        recon = jax.vmap(model.decode)(model.unscale_latents(z))
        ```
    """

    encoder: Encoder
    decoder: Decoder
    quant_conv: eqx.nn.Conv2d | None
    post_quant_conv: eqx.nn.Conv2d | None
    config: AutoencoderKLConfig = eqx.field(static=True)

    def __init__(
        self,
        config: AutoencoderKLConfig,
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ):
        """**Arguments:**

        - `config`: the hyperparameters; see [`eqx_vae.AutoencoderKLConfig`][].
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key for the random initialisation.
        """
        if not isinstance(config, AutoencoderKLConfig):
            raise TypeError(
                f"`config` must be an AutoencoderKLConfig, got {type(config).__name__}; "
                "use `AutoencoderKL.from_config` for a dict."
            )
        self.config = config
        # Build the structure abstractly, then draw all parameters in one sweep (see
        # `default_init`): far faster than initialising layer by layer.
        parts = default_init(eqx.filter_eval_shape(_build_parts, config, dtype), key)
        self.encoder, self.decoder, self.quant_conv, self.post_quant_conv = parts

    @classmethod
    def from_config(
        cls,
        config: AutoencoderKLConfig | Mapping[str, Any],
        dtype: DTypeLike | None = None,
        *,
        key: KeyArray,
    ) -> "AutoencoderKL":
        """Builds a randomly initialised model.

        **Arguments:**

        - `config`: an [`eqx_vae.AutoencoderKLConfig`][] or the contents of a diffusers
            `config.json`.
        - `dtype`: parameter dtype (float32 by default).
        - `key`: a JAX PRNG key.

        **Returns:**

        An `AutoencoderKL`. For a skeleton without any arrays (to load weights into),
        use `eqx.filter_eval_shape(AutoencoderKL.from_config, config, key=key)`.
        """
        if not isinstance(config, AutoencoderKLConfig):
            config = AutoencoderKLConfig.from_dict(config)
        return cls(config, dtype, key=key)

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.config.out_channels

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        """How many image pixels one latent pixel spans along each axis."""
        return self.config.spatial_factor

    @property
    def dtype(self) -> np.dtype:
        """The parameters' dtype (the default compute dtype)."""
        return np.dtype(self.encoder.conv_in.weight.dtype)

    def context(self, dtype: DTypeLike | None = None) -> Context:
        """The execution context for computing in `dtype` (by default the parameters'),
        after the precision policy: float16 on a model whose config sets
        `force_upcast` computes in float32."""
        compute = resolve_compute_dtype(dtype, self.dtype, self.config.force_upcast)
        return Context(compute_dtype=compute)

    def encode(
        self, x: Float[Array, "{self.in_channels} h w"], *, dtype: DTypeLike | None = None
    ) -> DiagonalGaussian:
        """Encodes an image to the latent posterior.

        **Arguments:**

        - `x`: an unbatched image in `[-1, 1]` of shape `(in_channels, height, width)`;
            height and width must be multiples of `spatial_factor`.
        - `dtype`: the compute dtype, by default the parameters'. In `bfloat16` or
            `float16` the convolutions and matmuls take half-precision inputs while
            normalisation, softmax, accumulation and the activations between layers stay
            in float32 (so nothing overflows); `float16` on a model whose config sets
            `force_upcast` computes in float32, as diffusers does.

        **Returns:**

        A [`eqx_vae.DiagonalGaussian`][] over latents of shape
        `(latent_channels, height / f, width / f)`.
        """
        _check_input(x, "encode", "image", self.in_channels, self.spatial_factor)
        ctx = self.context(dtype)
        return DiagonalGaussian.from_moments(to_chw(self.encode_hwc(to_hwc(x), ctx)))

    def encode_hwc(
        self, x: Float[Array, "h w {self.in_channels}"], ctx: Context
    ) -> Float[
        Array, "h//{self.spatial_factor} w//{self.spatial_factor} {2*self.latent_channels}"
    ]:
        """The posterior moments of a channels-last image, in a given `Context`."""
        moments = self.encoder.call_hwc(x.astype(ctx.stream_dtype(x.dtype)), ctx)
        if self.quant_conv is not None:
            moments = conv_hwc(self.quant_conv, moments, ctx)
        return moments

    def decode(
        self, z: Float[Array, "{self.latent_channels} h w"], *, dtype: DTypeLike | None = None
    ) -> Float[Array, "{self.out_channels} {self.spatial_factor}*h {self.spatial_factor}*w"]:
        """Decodes a latent (unscaled: see `unscale_latents`) to an image.

        **Arguments:**

        - `z`: an unbatched latent of shape `(latent_channels, height, width)`.
        - `dtype`: the compute dtype; see `encode`.

        **Returns:**

        An image of shape `(out_channels, height * f, width * f)`, nominally in
        `[-1, 1]` (not clipped), in float32 when computed in half precision.
        """
        _check_input(z, "decode", "latent", self.latent_channels, 1)
        return to_chw(self.decode_hwc(to_hwc(z), self.context(dtype)))

    def decode_hwc(
        self, z: Float[Array, "h w {self.latent_channels}"], ctx: Context
    ) -> Float[Array, "{self.spatial_factor}*h {self.spatial_factor}*w {self.out_channels}"]:
        """The image of a channels-last latent, in a given `Context`."""
        z = z.astype(ctx.stream_dtype(z.dtype))
        if self.post_quant_conv is not None:
            z = conv_hwc(self.post_quant_conv, z, ctx)
        return self.decoder.call_hwc(z, ctx)

    def __call__(
        self,
        x: Float[Array, "{self.in_channels} h w"],
        *,
        key: KeyArray | None = None,
        dtype: DTypeLike | None = None,
    ) -> Float[Array, "{self.out_channels} h w"]:
        """Reconstructs an image: encode, then decode a posterior sample when `key` is
        given, or the posterior mode when it is `None`, computing in `dtype`."""
        posterior = self.encode(x, dtype=dtype)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, dtype=dtype)

    def scale_latents(
        self, z: Float[Array, "*batch {self.latent_channels} h w"]
    ) -> Float[Array, "*batch {self.latent_channels} h w"]:
        """Maps a raw latent to the normalised latent a diffusion model is trained on,
        following the published pipelines:

        - `latents_mean`/`latents_std` set: `(z - mean) * scaling_factor / std`;
        - `shift_factor` set (SD3, FLUX.1): `(z - shift_factor) * scaling_factor`;
        - otherwise (SD 1.x/2.x, SDXL): `z * scaling_factor`.

        Elementwise, so leading batch axes are allowed.
        """
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = _broadcast_stats(z, c.latents_mean, c.latents_std)
            return (z - mean) * c.scaling_factor / std
        if c.shift_factor is not None:
            return (z - c.shift_factor) * c.scaling_factor
        return z * c.scaling_factor

    def unscale_latents(
        self, z: Float[Array, "*batch {self.latent_channels} h w"]
    ) -> Float[Array, "*batch {self.latent_channels} h w"]:
        """The inverse of `scale_latents`: call it on a diffusion model's output before
        `decode`."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = _broadcast_stats(z, c.latents_mean, c.latents_std)
            return z * std / c.scaling_factor + mean
        if c.shift_factor is not None:
            return z / c.scaling_factor + c.shift_factor
        return z / c.scaling_factor


def _broadcast_stats(
    z: Array, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Array, Array]:
    """Per-channel latent statistics shaped to broadcast against `(*batch, C, H, W)`."""
    shape = (1,) * (z.ndim - 3) + (len(mean), 1, 1)
    return (
        jnp.asarray(np.reshape(mean, shape), z.dtype),
        jnp.asarray(np.reshape(std, shape), z.dtype),
    )


def _build_parts(
    c: AutoencoderKLConfig, dtype: DTypeLike | None
) -> tuple[Encoder, Decoder, eqx.nn.Conv2d | None, eqx.nn.Conv2d | None]:
    """The model's layers, with throwaway initial values (used under
    `eqx.filter_eval_shape`, which only keeps their shapes)."""
    k_enc, k_dec, k_quant, k_post = jax.random.split(jax.random.key(0), 4)
    encoder = Encoder(
        c.in_channels,
        c.latent_channels,
        c.block_out_channels,
        c.layers_per_block,
        c.norm_num_groups,
        c.mid_block_add_attention,
        dtype,
        key=k_enc,
    )
    decoder = Decoder(
        c.latent_channels,
        c.out_channels,
        c.block_out_channels,
        c.layers_per_block,
        c.norm_num_groups,
        c.mid_block_add_attention,
        dtype,
        key=k_dec,
    )
    moments = 2 * c.latent_channels
    quant_conv = (
        eqx.nn.Conv2d(moments, moments, 1, dtype=dtype, key=k_quant) if c.use_quant_conv else None
    )
    post_quant_conv = (
        eqx.nn.Conv2d(c.latent_channels, c.latent_channels, 1, dtype=dtype, key=k_post)
        if c.use_post_quant_conv
        else None
    )
    return encoder, decoder, quant_conv, post_quant_conv


def _check_input(x: Any, method: str, what: str, channels: int, multiple: int) -> None:
    """Raises a clear error for inputs that would otherwise fail deep inside XLA or give
    silently wrong results."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"`{method}` expects a JAX or NumPy array, got {type(x).__name__}.")
    if not jnp.issubdtype(dtype, jnp.floating):
        hint = (
            " Convert 8-bit images with `x.astype(jnp.float32) / 127.5 - 1`."
            if what == "image"
            else ""
        )
        raise TypeError(f"`{method}` expects a floating-point {what}, got dtype {dtype}.{hint}")
    if len(shape) != 3:
        batch_hint = (
            f" `{method}` is unbatched: for a batch use `jax.vmap(model.{method})(x)`."
            if len(shape) == 4
            else ""
        )
        raise ValueError(
            f"`{method}` expects one {what} of shape (channels, height, width), got "
            f"shape {tuple(shape)}.{batch_hint}"
        )
    if shape[0] != channels:
        layout_hint = (
            " The layout is channels-first: transpose (height, width, channels) with "
            "`x.transpose(2, 0, 1)`."
            if shape[-1] == channels
            else ""
        )
        raise ValueError(
            f"`{method}` expects {channels} channels, got shape {tuple(shape)}.{layout_hint}"
        )
    height, width = shape[1], shape[2]
    if height % multiple or width % multiple:
        raise ValueError(
            f"`{method}` needs height and width that are multiples of {multiple} (the "
            f"spatial factor), got {height}x{width}; pad or crop the {what} to "
            f"{-(-height // multiple) * multiple}x{-(-width // multiple) * multiple} or "
            f"{height // multiple * multiple}x{width // multiple * multiple}."
        )
