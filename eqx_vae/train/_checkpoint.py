import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from .._errors import CheckpointError
from .._serialisation import _check_format, read_tree_file, write_tree_file
from .._version import __version__
from ._data import DataPosition
from ._state import TrainConfig, TrainState


MAGIC = b"EQXTRN\x00\n"
FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    *,
    config: TrainConfig,
    position: DataPosition,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Writes the whole training state (autoencoder, log-variance, discriminator,
    optimiser states, EMA, step) and the data position to one file, atomically."""
    header = {
        "format": "eqx_vae_training",
        "format_version": FORMAT_VERSION,
        "eqx_vae_version": __version__,
        "config": config.to_dict(),
        "step": int(state.step),
        "position": {"epoch": position.epoch, "index": position.index},
        "metadata": metadata or {},
        "leaves": [[list(x.shape), jnp.dtype(x.dtype).name] for x in _leaves(state)],
    }
    write_tree_file(path, MAGIC, header, state)


def load_checkpoint(
    path: str | os.PathLike[str], like: TrainState
) -> tuple[TrainState, DataPosition, dict[str, Any]]:
    """Reads a training checkpoint into the structure of `like` (a state built the
    same way, for instance by `init_state`, or its `eqx.filter_eval_shape`).

    **Returns:**

    The state, the data position to continue from, and the file's header.
    """

    def skeleton(header: dict[str, Any], path: pathlib.Path) -> TrainState:
        _check_format(header, path, "eqx_vae_training", FORMAT_VERSION)
        expected = [[list(x.shape), jnp.dtype(x.dtype).name] for x in _leaves(like)]
        if header.get("leaves") != expected:
            raise CheckpointError(
                f"{path} holds a training state of another structure (a different model, "
                "discriminator, optimiser or EMA setting) than the one given to load into."
            )
        return like

    state, header = read_tree_file(path, MAGIC, skeleton, "an eqx_vae training checkpoint")
    position = DataPosition(**header["position"])
    return state, position, header


def _leaves(state: Any) -> list[Any]:
    return [
        x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and hasattr(x, "dtype")
    ]
