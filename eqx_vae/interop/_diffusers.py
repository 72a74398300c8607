"""diffusers model folders: `config.json` next to `diffusion_pytorch_model.safetensors`
(or a sharded checkpoint with an `.index.json`, or the Flax era's
`diffusion_flax_model.msgpack`), possibly under a pipeline's `vae/`."""

import contextlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._autoencoder import AutoencoderKL
from .._config import AutoencoderKLConfig
from .._custom_types import DTypeLike
from .._errors import CheckpointError
from .._files import atomic_write
from .._flax_params import flax_leaves, load_flax_leaves, to_flax_params
from .._state_dict import from_diffusers_state_dict, to_diffusers_state_dict
from ._flax_msgpack import FLAX_WEIGHTS_NAME, read_flax_msgpack, write_flax_msgpack
from ._path_first import path_first
from ._safetensors import SafetensorsFile, TensorRef, write_safetensors
from ._torch_files import load_torch_file


WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
# The diffusers release whose file layout `save_diffusers` writes.
DIFFUSERS_VERSION = "0.32.0"


def resolve_model_folder(
    path: str | os.PathLike[str], subfolder: str | None = "vae"
) -> pathlib.Path:
    """The folder holding `config.json`: `path` itself, or `path/subfolder` for a
    pipeline folder."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder.")
    if (path / CONFIG_NAME).is_file():
        return path
    if subfolder and (path / subfolder / CONFIG_NAME).is_file():
        return path / subfolder
    where = f" or in its {subfolder!r} subfolder" if subfolder else ""
    raise CheckpointError(f"{path} has no {CONFIG_NAME}{where}; is it a diffusers model folder?")


def load_diffusers(
    path: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = None,
    variant: str | None = None,
    subfolder: str | None = "vae",
    check_finite: bool = False,
) -> AutoencoderKL:
    """Loads a diffusers `AutoencoderKL` or `AutoencoderKLFlux2` folder (for FLUX.2 with
    its BatchNorm statistics, `bn.running_mean` and `bn.running_var`).

    **Arguments:**

    - `path`: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
        (or a sharded `diffusion_pytorch_model.safetensors.index.json` with its shards,
        a pickled `diffusion_pytorch_model.bin` where torch is installed, or, with none
        of these, the `diffusion_flax_model.msgpack` of diffusers' `FlaxAutoencoderKL`,
        read with the `flax` extra's msgpack and without flax), or a pipeline folder
        whose `subfolder` (by default `vae/`) is one.
    - `dtype`: parameter dtype: `jnp.float32` (the default), `jnp.bfloat16` or
        `jnp.float16`, whatever the files store.
    - `variant`: load `diffusion_pytorch_model.<variant>.safetensors`, e.g. `"fp16"`.
    - `subfolder`: the subfolder of a pipeline folder to look in.
    - `check_finite`: refuse weights that contain NaN or infinity.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][], read tensor by tensor straight into the arrays it
    keeps (no random initialisation, no second copy of the weights).

    **Raises:**

    [`eqx_vae.CheckpointError`][] for a missing, truncated or damaged file, a config that
    does not match the weights, or weights that do not fit the model (all reported at
    once).
    """
    folder = resolve_model_folder(path, subfolder)
    config = read_config(folder / CONFIG_NAME)
    with contextlib.ExitStack() as stack:
        tensors = _open_weights(folder, variant, stack)
        flax_tree = read_flax_msgpack(folder / FLAX_WEIGHTS_NAME) if tensors is None else None
        try:
            if flax_tree is not None:
                leaves, problems = flax_leaves(flax_tree)
                del flax_tree  # each array is let go of once it is converted
                return load_flax_leaves(
                    leaves, problems, config, dtype=dtype, check_finite=check_finite
                )
            assert tensors is not None
            return from_diffusers_state_dict(
                tensors, config, dtype=dtype, check_finite=check_finite
            )
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from None


def read_config(path: pathlib.Path) -> AutoencoderKLConfig:
    """Reads and validates a diffusers `config.json`."""
    try:
        contents = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    try:
        return AutoencoderKLConfig.from_dict(contents)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid AutoencoderKL config: {e}") from e


def _open_weights(
    folder: pathlib.Path, variant: str | None, stack: contextlib.ExitStack
) -> Mapping[str, Any] | None:
    """The PyTorch weights of a folder, or `None` where there are only Flax ones."""
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return stack.enter_context(SafetensorsFile(single))
    if index.is_file():
        return _open_shards(index, stack)
    pickled = folder / f"{stem}.bin"
    if pickled.is_file():
        return load_torch_file(pickled)
    if variant is None and (folder / FLAX_WEIGHTS_NAME).is_file():
        return None
    present = sorted(
        p.name for p in folder.iterdir() if WEIGHTS_NAME in p.name or p.name == FLAX_WEIGHTS_NAME
    )
    hint = f"; present: {present}" if present else ""
    variant_hint = "" if variant is None else f" (variant={variant!r})"
    raise CheckpointError(
        f"{folder} has no {single.name} or {index.name}{variant_hint} (nor {pickled.name} "
        f"or {FLAX_WEIGHTS_NAME}){hint}."
    )


def _open_shards(index: pathlib.Path, stack: contextlib.ExitStack) -> dict[str, TensorRef]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index: {e}") from e
    tensors: dict[str, TensorRef] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = index.parent / shard_name
        if pathlib.Path(shard_name).name != shard_name or not shard_path.is_file():
            raise CheckpointError(f"{index} names the shard {shard_name!r}, which is missing.")
        shard = stack.enter_context(SafetensorsFile(shard_path))
        for name in shard:
            if weight_map.get(name) != shard_name:
                raise CheckpointError(
                    f"{shard_path} holds {name!r}, which {index.name} places in "
                    f"{weight_map.get(name)!r}."
                )
            tensors[name] = shard[name]
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(f"{index} lists tensors that no shard holds: {absent[:10]}.")
    return tensors


@path_first
def save_diffusers(
    path: str | os.PathLike[str],
    model: AutoencoderKL,
    *,
    dtype: DTypeLike | None = None,
    variant: str | None = None,
    format: Literal["safetensors", "flax"] = "safetensors",
) -> None:
    """Writes `model` as a diffusers model folder (`config.json` and
    `diffusion_pytorch_model[.variant].safetensors`) that
    `diffusers.AutoencoderKL.from_pretrained` loads, or for FLUX.2
    `diffusers.AutoencoderKLFlux2.from_pretrained` (with the BatchNorm statistics under
    `bn.*`).

    Each file is written under a temporary name and renamed into place, weights first,
    so no file in `path` is ever half-written.

    **Arguments:**

    - `path`: the folder; created if missing.
    - `model`: an [`eqx_vae.AutoencoderKL`][].
    - `dtype`: the dtype to store the floating-point arrays in, e.g. `jnp.float16`; by
        default the model's. FLUX.2's `bn.num_batches_tracked` stays an int64.
    - `variant`: write `diffusion_pytorch_model.<variant>.safetensors`.
    - `format`: `"flax"` writes the weights as `diffusion_flax_model.msgpack` instead,
        in the layout of [`eqx_vae.to_flax_params`][], which diffusers'
        `FlaxAutoencoderKL.from_pretrained` loads (the `flax` extra; Flax weights have
        no variants).

    A model whose decoder is narrower than its encoder can be written only for FLUX.2:
    diffusers' `AutoencoderKL` has no `decoder_block_out_channels`, so for other
    families this raises a `ValueError` (use [`eqx_vae.save`][] or
    [`eqx_vae.save_single_file`][]).

    The path comes first, as in [`eqx_vae.save`][]; the model-first order of earlier
    versions, `save_diffusers(model, path)`, still works for one release with a
    `DeprecationWarning`.
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"`model` must be an AutoencoderKL, got {type(model).__name__}.")
    if format not in ("safetensors", "flax"):
        raise ValueError(f'`format` must be "safetensors" or "flax", got {format!r}.')
    if format == "flax" and variant is not None:
        raise ValueError(
            f"Flax weights have no variants (got variant={variant!r}): diffusers reads "
            f"only {FLAX_WEIGHTS_NAME}; leave `variant` out."
        )
    config = model.config
    if format == "flax" and (
        config.patch_size is not None or config.decoder_block_out_channels is not None
    ):
        raise ValueError(
            "diffusers' FlaxAutoencoderKL has no FLUX.2 BatchNorm and no narrower decoder; "
            'write this model with format="safetensors".'
        )
    if config.patch_size is None and config.decoder_block_out_channels is not None:
        raise ValueError(
            "diffusers' AutoencoderKL has no `decoder_block_out_channels`, so it cannot "
            f"load this model's decoder ({config.decoder_block_out_channels} against "
            f"the encoder's {config.block_out_channels}); write it with `eqx_vae.save` "
            "or `eqx_vae.save_single_file`."
        )
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "flax":
        params = to_flax_params(model)
        if np_dtype is not None:
            params = jax.tree_util.tree_map(lambda a: a.astype(np_dtype), params)
        write_flax_msgpack(folder / FLAX_WEIGHTS_NAME, params)
    else:
        state_dict = to_diffusers_state_dict(model)
        if np_dtype is not None:
            state_dict = {
                k: v if np.issubdtype(v.dtype, np.integer) else v.astype(np_dtype)
                for k, v in state_dict.items()
            }
        stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
        write_safetensors(folder / f"{stem}.safetensors", state_dict, metadata={"format": "pt"})
    config = model.config.to_dict()
    config["_diffusers_version"] = DIFFUSERS_VERSION
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_text(path: pathlib.Path, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))
