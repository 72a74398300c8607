"""Image quality metrics: PSNR, SSIM, the bicubic baseline and a colour chart."""

import math

import jax
import jax.numpy as jnp
import numpy as np
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


COLOUR_CHART: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "light grey": (192, 192, 192),
    "white": (255, 255, 255),
    "dark skin": (115, 82, 68),
    "light skin": (194, 150, 130),
    "pale skin": (241, 194, 170),
    "deep skin": (80, 50, 35),
    "blue sky": (98, 122, 157),
    "foliage": (87, 108, 67),
    "navy": (20, 30, 90),
    "orange": (214, 126, 44),
    "purple": (94, 60, 108),
}
"""Twenty colours by name, as sRGB in 0-255: saturated primaries and secondaries, black,
greys and white, skin tones, and a few colours of the ColorChecker chart (blue sky,
foliage, orange, purple) and navy."""


def _chart_colour(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def colour_chart(patch: int = 32, columns: int = 5) -> np.ndarray:
    """The colours of `COLOUR_CHART` as a `(3, H, W)` image in `[-1, 1]`: square
    patches of side `patch`, `columns` a row, in the dictionary's order (the last row
    padded with black)."""
    rows = -(-len(COLOUR_CHART) // columns)
    image = np.full((3, rows * patch, columns * patch), -1.0, np.float32)
    for i, rgb in enumerate(COLOUR_CHART.values()):
        r, c = divmod(i, columns)
        image[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = _chart_colour(rgb)[
            :, None, None
        ]
    return image


def colour_chart_errors(
    reconstruction: Float[Array, "3 h w"] | np.ndarray,
    patch: int = 32,
    columns: int = 5,
    inset: int = 6,
) -> dict[str, np.ndarray]:
    """Per patch of a reconstructed [`eqx_vae.metrics.colour_chart`][], the mean of
    reconstruction minus the patch's colour per channel (R, G, B), over the patch less
    `inset` pixels at each edge (where neighbouring patches blur in)."""
    recon = np.asarray(reconstruction, np.float32)
    errors = {}
    for i, (name, rgb) in enumerate(COLOUR_CHART.items()):
        r, c = divmod(i, columns)
        window = recon[
            :,
            r * patch + inset : (r + 1) * patch - inset,
            c * patch + inset : (c + 1) * patch - inset,
        ]
        errors[name] = window.mean(axis=(1, 2)) - _chart_colour(rgb)
    return errors


def flat_colours(size: int = 64) -> np.ndarray:
    """The colours of `COLOUR_CHART` as flat images, one colour each:
    `(len(COLOUR_CHART), 3, size, size)` in `[-1, 1]`, in the dictionary's order."""
    colours = np.stack([_chart_colour(rgb) for rgb in COLOUR_CHART.values()])
    return np.ascontiguousarray(
        np.broadcast_to(colours[:, :, None, None], (len(colours), 3, size, size))
    )
