"""Reading and writing 8-bit image files as float arrays in `[-1, 1]` (Pillow)."""

import os
import pathlib
from typing import Any

import numpy as np


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as float32 `(3, H, W)` in `[-1, 1]`.

    Grayscale images become RGB with three equal channels. An image with transparency
    (RGBA, LA, or a palette or RGB image with a transparent colour) is composited on a
    white background: each pixel is `alpha * colour + (1 - alpha) * white`, so a fully
    transparent pixel reads as white whatever colour it stores.

    **Raises:**

    `FileNotFoundError` if there is no such file and `ValueError` naming the file if it
    cannot be read as an image.
    """
    from PIL import Image, UnidentifiedImageError

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"The image {path} does not exist.")
    try:
        with Image.open(path) as image:
            if _has_transparency(image):
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
                alpha = rgba[..., 3:] / 255.0
                rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
            else:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"Cannot read the image {path}: {e}") from e
    return np.transpose(rgb / 127.5 - 1.0, (2, 0, 1))


def _has_transparency(image: Any) -> bool:
    """Whether a Pillow image has an alpha channel or a transparent colour (a palette
    entry or, for RGB and grayscale images, one colour named by PNG's `tRNS`)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def write_image(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Writes a `(3, H, W)` image in `[-1, 1]` (clipped) as an 8-bit file, creating its
    folder; the format follows the suffix (`ValueError` for an unknown one)."""
    from PIL import Image

    pixels = np.clip((np.asarray(image, np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(np.transpose(pixels.astype(np.uint8), (1, 2, 0))).save(path)
    except (KeyError, ValueError) as e:  # an unknown suffix
        raise ValueError(f"Cannot write an image to {path}: {e}") from e


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resizing (antialiased when shrinking) of a `(C, H, W)` float image in
    `[-1, 1]` to `size` (`(H, W)`, or one side for a square)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    channels = [
        np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        for c in image
    ]
    return np.clip(np.stack(channels), -1.0, 1.0)
