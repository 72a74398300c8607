"""Image quality metrics: PSNR and SSIM."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def psnr(
    x: Float[Array, "*shape"], y: Float[Array, "*shape"], *, data_range: float = 2.0
) -> Float[Array, ""]:
    """Peak signal-to-noise ratio in dB, `10 log10(data_range^2 / mean((x - y)^2))`.
    The default range suits images in `[-1, 1]`."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
    return 10.0 * jnp.log10(data_range**2 / mse)


def ssim(
    x: Float[Array, "c h w"],
    y: Float[Array, "c h w"],
    *,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
) -> Float[Array, ""]:
    """Structural similarity (Wang et al., 2004) of two unbatched images: Gaussian
    windows of size 11 and standard deviation 1.5, `K1 = 0.01`, `K2 = 0.03`, averaged
    over the valid positions and the channels."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    offsets = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
    taps = jnp.exp(-jnp.square(offsets) / (2 * sigma**2))
    taps = taps / jnp.sum(taps)

    def blur(image: Array) -> Array:
        # Separable Gaussian filter of each channel, valid positions only.
        channels = image.shape[0]
        rows = taps.reshape(1, 1, window, 1)
        cols = taps.reshape(1, 1, 1, window)
        image = image[None]
        for kernel in (rows, cols):
            image = jax.lax.conv_general_dilated(
                image,
                jnp.tile(kernel, (channels, 1, 1, 1)),
                (1, 1),
                "VALID",
                feature_group_count=channels,
            )
        return image[0]

    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return jnp.mean(numerator / denominator)


def bicubic_baseline(x: Float[Array, "c h w"], values: int) -> Float[Array, "c h w"]:
    """`x` downsampled bicubically to at most `values` numbers (as many as a latent
    holds), then upsampled back: the reference a learned autoencoder should beat."""
    c, h, w = x.shape
    factor = math.sqrt(c * h * w / values)
    small = (c, max(1, int(h / factor)), max(1, int(w / factor)))
    down = jax.image.resize(x, small, method="bicubic")
    return jax.image.resize(down, x.shape, method="bicubic")
