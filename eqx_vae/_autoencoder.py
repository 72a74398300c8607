from collections.abc import Mapping
from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float

from . import _init as init
from ._batch_norm import LatentBatchNorm
from ._block import Step, block_step, conv_step, run_steps
from ._checks import check_input
from ._config import AutoencoderKLConfig
from ._custom_types import DTypeLike, KeyArray
from ._decoder import Decoder
from ._distribution import DiagonalGaussian
from ._encoder import Encoder
from ._halo import to_chw, to_hwc
from ._latents import scale_latents, unscale_latents
from ._policy import Policy, resolve
from ._scope import Scope


class AutoencoderKL(eqx.Module):
    """The KL autoencoder of latent diffusion (Stable Diffusion 1.x/2.x, SDXL, SD3,
    FLUX.1, FLUX.2), with the structure and parameter names of diffusers'
    `AutoencoderKL` (and, for FLUX.2, `AutoencoderKLFlux2`, whose model also carries the
    statistics of its latent BatchNorm, `bn`).

    Every method is unbatched: images are `(channels, height, width)`; use `jax.vmap`
    for batches. Images are in `[-1, 1]`. How a method runs (compute dtype,
    checkpointing, a sharded axis, ...) is its `policy`, an [`eqx_vae.Policy`][], the same
    object every block of the model takes.

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
    bn: LatentBatchNorm | None
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
        - `key`: a JAX PRNG key for the random initialisation. The encoder, decoder,
            `quant_conv` and `post_quant_conv` are built from `jax.random.split(key, 4)`
            in that order, so `Encoder(..., key=jax.random.split(key, 4)[0])` equals
            `model.encoder`; the same key gives the same parameters eagerly, under
            `jax.jit` and under `eqx.filter_eval_shape`. FLUX.2's BatchNorm statistics
            (`bn`, present when the config has a `patch_size`) start at mean 0 and
            variance 1.
        """
        if not isinstance(config, AutoencoderKLConfig):
            raise TypeError(
                f"`config` must be an AutoencoderKLConfig, got {type(config).__name__}; "
                "use `AutoencoderKL.from_config` for a dict."
            )
        c = config
        self.config = c
        k_enc, k_dec, k_quant, k_post = init.split_keys(key, 4)
        self.encoder = Encoder(
            c.in_channels,
            c.latent_channels,
            c.block_out_channels,
            c.layers_per_block,
            c.norm_num_groups,
            c.mid_block_add_attention,
            dtype,
            key=k_enc,
        )
        self.decoder = Decoder(
            c.latent_channels,
            c.out_channels,
            c.decoder_channels,
            c.layers_per_block,
            c.norm_num_groups,
            c.mid_block_add_attention,
            dtype,
            key=k_dec,
        )
        moments = 2 * c.latent_channels
        self.quant_conv = (
            init.conv2d(moments, moments, 1, dtype=dtype, key=k_quant)
            if c.use_quant_conv
            else None
        )
        self.post_quant_conv = (
            init.conv2d(c.latent_channels, c.latent_channels, 1, dtype=dtype, key=k_post)
            if c.use_post_quant_conv
            else None
        )
        self.bn = (
            None
            if c.patch_size is None
            else LatentBatchNorm(
                c.scaled_latent_channels, c.batch_norm_eps, c.batch_norm_momentum, dtype
            )
        )

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

    def resolve_policy(
        self, policy: Policy | None = None, *, dtype: DTypeLike | None = None
    ) -> Policy:
        """The policy `encode` and `decode` run under for the arguments `policy` and
        `dtype`: `dtype` (a shorthand for `policy.dtype`; give it in one place only)
        or, when neither sets one, the parameters' dtype; then a `float16` request on a
        model whose config sets `force_upcast` (the published SD and SDXL VAEs, whose
        activations exceed float16's range) computes in float32, as diffusers'
        pipelines do."""
        return resolve(policy, dtype, self.dtype, force_upcast=self.config.force_upcast)

    def encode(
        self,
        x: Float[Array, "{self.in_channels} h w"],
        *,
        dtype: DTypeLike | None = None,
        policy: Policy | None = None,
    ) -> DiagonalGaussian:
        """Encodes an image to the latent posterior.

        **Arguments:**

        - `x`: an unbatched image in `[-1, 1]` of shape `(in_channels, height, width)`;
            height and width must be multiples of `spatial_factor`.
        - `dtype`: the compute dtype, by default the parameters'; a shorthand for
            `policy=Policy(dtype=...)`. In `bfloat16` or `float16` the convolutions and
            matmuls take half-precision inputs while normalisation, softmax,
            accumulation and the activations between layers stay in float32 (so nothing
            overflows); `float16` on a model whose config sets `force_upcast` computes
            in float32, as diffusers does.
        - `policy`: how to run; see [`eqx_vae.Policy`][] and `resolve_policy`.

        **Returns:**

        A [`eqx_vae.DiagonalGaussian`][] over latents of shape
        `(latent_channels, height / f, width / f)`.
        """
        check_input(x, "encode", "image", self.in_channels, self.spatial_factor)
        return posterior(
            self._run(self._encode_steps(), x, self.resolve_policy(policy, dtype=dtype))
        )

    def decode(
        self,
        z: Float[Array, "{self.latent_channels} h w"],
        *,
        dtype: DTypeLike | None = None,
        policy: Policy | None = None,
    ) -> Float[Array, "{self.out_channels} {self.spatial_factor}*h {self.spatial_factor}*w"]:
        """Decodes a latent (unscaled: see `unscale_latents`) to an image.

        **Arguments:**

        - `z`: an unbatched latent of shape `(latent_channels, height, width)`.
        - `dtype`, `policy`: as in `encode`.

        **Returns:**

        An image of shape `(out_channels, height * f, width * f)`, nominally in
        `[-1, 1]` (not clipped), in float32 when computed in half precision.
        """
        check_input(z, "decode", "latent", self.latent_channels, 1)
        return to_chw(self._run(self._decode_steps(), z, self.resolve_policy(policy, dtype=dtype)))

    def __call__(
        self,
        x: Float[Array, "{self.in_channels} h w"],
        *,
        key: KeyArray | None = None,
        dtype: DTypeLike | None = None,
        policy: Policy | None = None,
    ) -> Float[Array, "{self.out_channels} h w"]:
        """Reconstructs an image: encode, then decode a posterior sample when `key` is
        given, or the posterior mode when it is `None`, under `dtype`/`policy` (as in
        `encode`)."""
        posterior = self.encode(x, dtype=dtype, policy=policy)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, dtype=dtype, policy=policy)

    # The forward passes as steps, shared by `encode`/`decode`, tiling, sharding and
    # training: the blocks' own forward passes, and the 1x1 convolutions around the
    # latent.

    def _encode_steps(self) -> tuple[Step, ...]:
        """The steps from a channels-last image to the posterior's moments."""
        steps = [block_step("encoder", self.encoder)]
        if self.quant_conv is not None:
            steps.append(conv_step("quant_conv", self.quant_conv))
        return tuple(steps)

    def _decode_steps(self) -> tuple[Step, ...]:
        """The steps from a channels-last latent to the image."""
        steps = (
            []
            if self.post_quant_conv is None
            else [conv_step("post_quant_conv", self.post_quant_conv)]
        )
        return (*steps, block_step("decoder", self.decoder))

    def _run(
        self,
        steps: tuple[Step, ...],
        x: Float[Array, "c h w"],
        policy: Policy,
        valid: Float[Array, "2"] | None = None,
    ) -> Array:
        """The steps on a channels-first input under a resolved policy; channels-last
        result. With `valid` (fractions of the rows and columns), only the top-left part
        of the input is the image and the rest is padding it does not see (see
        `Scope`)."""
        out, _ = run_steps(steps, self._prepare(x, policy), Scope(policy, valid=valid))
        return out

    def _prepare(self, x: Float[Array, "c h w"], policy: Policy) -> Float[Array, "h w c"]:
        """A channels-first input as the first step takes it: channels-last, in the
        policy's stream dtype."""
        return to_hwc(x.astype(policy.stream_dtype(x.dtype)))

    def scale_latents(
        self, z: Float[Array, "*batch {self.latent_channels} h w"]
    ) -> Float[
        Array,
        "*batch {self.config.scaled_latent_channels} "
        "h//{self.config.latent_patch[0]} w//{self.config.latent_patch[1]}",
    ]:
        """Maps a raw latent to the normalised latent a diffusion model is trained on,
        following the published pipelines:

        - `latents_mean`/`latents_std` set: `(z - mean) * scaling_factor / std`;
        - `shift_factor` set (SD3, FLUX.1): `(z - shift_factor) * scaling_factor`;
        - FLUX.2 (a `patch_size`): each 2x2 patch folded into the channels, as
            diffusers' `Flux2Pipeline` does (channel `4 * c + 2 * dy + dx` holds pixel
            `(dy, dx)` of channel `c`'s patches), then normalised by the model's
            BatchNorm statistics: `(z - bn.running_mean) / sqrt(bn.running_var + eps)`.
            A `(C, h, w)` latent becomes `(4 * C, h / 2, w / 2)` (`(128, H / 16, W / 16)`
            for FLUX.2's 32 channels and an `H x W` image); `h` and `w` must be even;
        - otherwise (SD 1.x/2.x, SDXL): `z * scaling_factor`.

        Leading batch axes are allowed: `(*batch, C, h, w)`.
        """
        return scale_latents(self.config, self.bn, z)

    def unscale_latents(
        self,
        z: Float[
            Array,
            "*batch {self.config.scaled_latent_channels} h w",
        ],
    ) -> Float[
        Array,
        "*batch {self.latent_channels} "
        "{self.config.latent_patch[0]}*h {self.config.latent_patch[1]}*w",
    ]:
        """The inverse of `scale_latents`: call it on a diffusion model's output before
        `decode` (for FLUX.2, `(4 * C, h, w)` becomes `(C, 2 * h, 2 * w)`)."""
        return unscale_latents(self.config, self.bn, z)


def posterior(moments: Float[Array, "h w two_c"]) -> DiagonalGaussian:
    """The posterior of channels-last moments (mean, then log-variance channels)."""
    return DiagonalGaussian.from_moments(to_chw(moments))
