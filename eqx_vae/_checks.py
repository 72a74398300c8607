"""Clear errors for inputs that would otherwise fail deep inside XLA or give silently
wrong results."""

from typing import Any

import jax.numpy as jnp


def check_input(x: Any, method: str, what: str, channels: int, multiple: int) -> None:
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
