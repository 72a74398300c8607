import numpy as np

from ._data import Samples


class DeadLeaves(Samples):
    """Synthetic images of the dead-leaves model: discs dropped one on top of another
    until they cover the image, with radii drawn from a power law, so that the images
    have the scale invariance, occlusions and edges of photographs. Training on them
    teaches priors that carry over to real photographs (Achddou, Gousseau and Ladjal,
    "Synthetic images as a regularity prior for image restoration neural networks",
    2021).

    Each sample is a function of `(seed, epoch, index)` alone, drawn on the CPU in a
    few milliseconds; batches stream like those of [`eqx_vae.train.ImageFolder`][],
    and the two mix with [`eqx_vae.train.Mixture`][].

    **Arguments:**

    - `crop_size`: the images' side, in pixels.
    - `batch_size`: images per batch.
    - `seed`: the stream's seed.
    - `colours`: `(N, 3)` RGB colours in `[-1, 1]` to draw each disc's colour from
        (pixels of real photographs, say); by default uniform in the RGB cube.
    - `exponent`: the radii's density is proportional to `radius ** -exponent` (3 is
        scale invariant).
    - `radius`: the smallest and largest radius, in pixels; the largest is the image's
        side by default. Discs smaller than the default smallest, 4 pixels, fill the
        images with detail that an autoencoder of spatial factor 4 or more cannot keep.
    - `texture`: the probability that a disc is shaded with a linear gradient rather
        than flat.
    - `blur`: the range of the standard deviation, in pixels, of the Gaussian blur of
        each image (uniform).
    - `noise`: the range of the standard deviation of the Gaussian noise added to each
        image, on the `[-1, 1]` scale (uniform).
    - `contrast`: if given, a range `(low, high)` within `[0, 1]`: each image is blended
        towards one colour (drawn like the discs') by a factor drawn uniformly from it, so
        that a factor of 1 leaves the image as it is and 0 makes it flat. Flat and
        low-contrast images (an overcast sky, a dim room) are rare in photographs, and an
        autoencoder that never sees them can shift their colour; `None` (the default)
        leaves every image at full contrast.
    - `supersample`: discs are drawn at this many times the resolution and averaged
        down, so that edges are antialiased.
    - `epoch_size`: images per epoch (it only numbers positions).
    """

    def __init__(
        self,
        *,
        crop_size: int,
        batch_size: int,
        seed: int = 0,
        colours: np.ndarray | None = None,
        exponent: float = 3.0,
        radius: tuple[float, float | None] = (4.0, None),
        texture: float = 0.5,
        blur: tuple[float, float] = (0.0, 1.5),
        noise: tuple[float, float] = (0.0, 0.02),
        contrast: tuple[float, float] | None = None,
        supersample: int = 2,
        epoch_size: int = 1024,
        prefetch: int = 2,
    ):
        if crop_size < 1 or batch_size < 1 or epoch_size < 1 or supersample < 1:
            raise ValueError(
                "Need positive crop, batch and epoch sizes and supersampling, got "
                f"{crop_size}, {batch_size}, {epoch_size} and {supersample}."
            )
        low, high = radius
        high = float(crop_size) if high is None else float(high)
        if not 0 < low <= high:
            raise ValueError(f"Need radii 0 < smallest <= largest, got {(low, high)}.")
        if exponent <= 1:
            raise ValueError(f"Need an exponent above 1, got {exponent}.")
        for name, (a, b) in (("blur", blur), ("noise", noise)):
            if not 0 <= a <= b:
                raise ValueError(f"Need a range 0 <= low <= high for {name}, got {(a, b)}.")
        if contrast is not None and not 0 <= contrast[0] <= contrast[1] <= 1:
            raise ValueError(f"Need a contrast range 0 <= low <= high <= 1, got {contrast}.")
        if colours is not None:
            colours = np.asarray(colours, np.float32)
            if colours.ndim != 2 or colours.shape[1] != 3 or len(colours) == 0:
                raise ValueError(f"Need colours of shape (N, 3), got {colours.shape}.")
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.seed = seed
        self.colours = colours
        self.exponent = float(exponent)
        self.radius = (float(low), high)
        self.texture = float(texture)
        self.blur = (float(blur[0]), float(blur[1]))
        self.noise = (float(noise[0]), float(noise[1]))
        self.contrast = None if contrast is None else (float(contrast[0]), float(contrast[1]))
        self.supersample = supersample
        self.epoch_size = epoch_size
        self.prefetch = prefetch

    def sample(self, epoch: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, index])
        k = self.supersample
        side = self.crop_size * k
        image = self._discs(rng, side, k)
        if k > 1:
            image = image.reshape(3, self.crop_size, k, self.crop_size, k).mean(axis=(2, 4))
        if self.contrast is not None:
            factor = rng.uniform(*self.contrast)
            base = self._colours(rng, 1)[0][:, None, None]
            image = base + factor * (image - base)
        sigma = rng.uniform(*self.blur)
        if sigma > 0:
            image = _gaussian_blur(image, sigma)
        noise = rng.uniform(*self.noise)
        if noise > 0:
            image = image + rng.normal(0.0, noise, image.shape)
        return np.clip(image, -1.0, 1.0).astype(np.float32)

    def _colours(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.colours is None:
            return rng.uniform(-1.0, 1.0, (n, 3))
        return self.colours[rng.integers(0, len(self.colours), n)].astype(np.float64)

    def _discs(self, rng: np.random.Generator, side: int, k: int) -> np.ndarray:
        """Discs dropped front to back: each one paints only the pixels that no disc
        in front of it covers, until none is left."""
        image = np.empty((side, side, 3))
        free = np.ones((side, side), bool)
        remaining = side * side
        low, high = (r * k for r in self.radius)
        a = 1.0 - self.exponent
        chunk = 256
        while remaining > 0:
            # Radii by inverting the power law's distribution function.
            u = rng.random(chunk)
            radii = (low**a + u * (high**a - low**a)) ** (1.0 / a)
            centres = rng.uniform(0.0, side, (chunk, 2))
            colours = self._colours(rng, chunk)
            textured = rng.random(chunk) < self.texture
            gradients = rng.normal(0.0, 0.25, (chunk, 2, 3))
            for r, (cy, cx), colour, shade, gradient in zip(
                radii, centres, colours, textured, gradients, strict=True
            ):
                y0, y1 = max(0, int(cy - r)), min(side, int(cy + r) + 2)
                x0, x1 = max(0, int(cx - r)), min(side, int(cx + r) + 2)
                if y0 >= y1 or x0 >= x1:
                    continue
                dy = np.arange(y0, y1)[:, None] + 0.5 - cy
                dx = np.arange(x0, x1)[None, :] + 0.5 - cx
                window = free[y0:y1, x0:x1]
                inside = (dy * dy + dx * dx <= r * r) & window
                count = int(inside.sum())
                if count == 0:
                    continue
                if shade:
                    ys, xs = np.nonzero(inside)
                    values = (
                        colour
                        + np.outer(dy[ys, 0] / r, gradient[0])
                        + np.outer(dx[0, xs] / r, gradient[1])
                    )
                    image[y0:y1, x0:x1][inside] = values
                else:
                    image[y0:y1, x0:x1][inside] = colour
                window &= ~inside
                remaining -= count
                if remaining == 0:
                    break
        return np.transpose(image, (2, 0, 1))


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of a `(C, H, W)` image, with reflected edges."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    _, h, w = image.shape
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    rows = np.zeros_like(image)
    for i, t in enumerate(taps):
        rows += t * padded[:, i : i + h]
    padded = np.pad(rows, ((0, 0), (0, 0), (radius, radius)), mode="reflect")
    out = np.zeros_like(image)
    for i, t in enumerate(taps):
        out += t * padded[:, :, i : i + w]
    return out
