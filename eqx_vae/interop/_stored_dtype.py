"""The dtype a model file or folder stores its parameters in, read without loading them
(a PyTorch pickle excepted, which has no header to read)."""

import collections
import contextlib
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._flax_params import flax_leaves
from .._state_dict import FLOATING, dtype_name, shape_of
from ._diffusers import _open_weights, resolve_model_folder
from ._flax_msgpack import FLAX_WEIGHTS_NAME, read_flax_msgpack
from ._safetensors import SafetensorsFile
from ._single_file import _reads_as_torch, _strip_prefix
from ._torch_files import load_torch_file


def stored_dtype(path: pathlib.Path, *, variant: str | None = None) -> np.dtype | None:
    """The floating dtype most of the autoencoder's parameters in `path` (a diffusers
    folder or an original single file) are stored in; `None` when it holds none."""
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            folder = resolve_model_folder(path)
            tensors = _open_weights(folder, variant, stack)
            if tensors is None:  # the Flax era's msgpack
                tensors = flax_leaves(read_flax_msgpack(folder / FLAX_WEIGHTS_NAME))[0]
        elif _reads_as_torch(path):
            tensors = _strip_prefix(load_torch_file(path))
        else:
            tensors = _strip_prefix(stack.enter_context(SafetensorsFile(path)))
        return _most_common_floating(tensors)


def _most_common_floating(tensors: Mapping[str, Any]) -> np.dtype | None:
    sizes: collections.Counter[str] = collections.Counter()
    for value in tensors.values():
        name = dtype_name(value)
        if name in FLOATING:
            sizes[name] += int(np.prod(shape_of(value)))
    if not sizes:
        return None
    return np.dtype(jnp.dtype(sizes.most_common(1)[0][0]))
