"""The order of the save functions' arguments: `(path, model, ...)`, as `eqx_vae.save`,
`train.save_checkpoint` and `eqx.tree_serialise_leaves` take them."""

import functools
import sys
import typing
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from .._autoencoder import AutoencoderKL


_P = ParamSpec("_P")
_R = TypeVar("_R")


def path_first(save: Callable[_P, _R]) -> Callable[_P, _R]:
    """`save(path, model, ...)`, which also accepts, with a `DeprecationWarning`, the
    order `save_diffusers` and `save_single_file` had before: the model first, as
    `save(model, path, ...)` or `save(model, path=path, ...)`. Calls by keyword alone
    mean the same in both orders and pass unchanged.

    The old order is to be refused from the release after the next one."""
    name = save.__name__

    # Nothing to check here: `save` checks its arguments.
    @functools.wraps(save)
    @typing.no_type_check
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], AutoencoderKL) and (len(args) > 1 or "path" in kwargs):
            model, *rest = args
            path = rest.pop(0) if rest else kwargs.pop("path")
            warnings.warn(
                f"`eqx_vae.{name}(model, path, ...)` is deprecated and will stop working in "
                f"the next release: pass the path first, `eqx_vae.{name}(path, model, ...)`, "
                "as `eqx_vae.save` takes them.",
                DeprecationWarning,
                stacklevel=_caller_level(),
            )
            args = (path, model, *rest)
        return save(*args, **kwargs)

    return wrapper  # pyright: ignore[reportReturnType]


_WRAPPERS = ("jaxtyping", "beartype", "typeguard")


def _caller_level() -> int:
    """The `stacklevel` that makes a warning raised in `wrapper` point at its caller,
    past any type-checking wrappers (an import hook) around either function."""
    frame = sys._getframe(1)
    while frame.f_code.co_name != "wrapper" or frame.f_globals.get("__name__") != __name__:
        frame = frame.f_back
        assert frame is not None
    level, frame = 2, frame.f_back
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _WRAPPERS:
        level, frame = level + 1, frame.f_back
    return level
