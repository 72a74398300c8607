"""Checking command-line arguments before any work starts (loading a model takes
seconds), with every problem worded in the command line's own terms: the option as
typed, the value given, and the rule."""

import pathlib
from typing import Any


# `tiled_encode`/`tiled_decode`'s rule for `tile_size` (`_tiling.check_tile(tile, 2)`:
# tiles on even pixels stay aligned when a stage halves or doubles the resolution);
# a test keeps the two in step.
TILE_MULTIPLE = 2
TILE_MINIMUM = 4 * TILE_MULTIPLE
TILE_HELP = (
    f"work in tiles of at most PX pixels a side (a multiple of {TILE_MULTIPLE}, at least "
    f"{TILE_MINIMUM}): memory bounded by the tile size, the same result"
)
# `jax.random.key` takes a 64-bit seed.
_SEED_RANGE = (-(2**63), 2**63 - 1)


class ArgumentProblems:
    """Collects what is wrong with the arguments, to report all of it at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, ok: bool, option: str, value: Any, rule: str) -> None:
        """Records `option value: rule` unless `ok`."""
        if not ok:
            self.problems.append(f"{option} {_show(value)}: {rule}")

    def at_least(self, option: str, value: Any, minimum: int | float) -> None:
        if value is not None:
            self.check(value >= minimum, option, value, f"must be at least {_show(minimum)}")

    def tile(self, value: int | None) -> None:
        if value is not None:
            self.check(
                value >= TILE_MINIMUM and value % TILE_MULTIPLE == 0,
                "--tile",
                value,
                f"must be a multiple of {TILE_MULTIPLE} and at least {TILE_MINIMUM} (pixels)",
            )

    def seed(self, option: str, value: int | None) -> None:
        if value is not None:
            low, high = _SEED_RANGE
            self.check(
                low <= value <= high,
                option,
                value,
                "must be a 64-bit integer (-2**63 to 2**63 - 1)",
            )

    def image_output(self, path: pathlib.Path) -> None:
        """An image file name that Pillow can write (by its suffix)."""
        from PIL import Image

        writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
        self.check(
            path.suffix.lower() in writable,
            "OUT",
            path,
            f"cannot write an image with the suffix {path.suffix!r} (use .png, .jpg, .webp, ...)"
            if path.suffix
            else "an image file needs a suffix that names its format (.png, .jpg, .webp, ...)",
        )

    def raise_if_any(self) -> None:
        """Raises `ValueError` listing every problem found."""
        if self.problems:
            raise ValueError("; ".join(self.problems) + ".")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return " ".join(_show(v) for v in value)
    return str(value)
