import json
import os
import pathlib
import struct
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._autoencoder import AutoencoderKL
from ._config import AutoencoderKLConfig
from ._errors import CheckpointError
from ._files import HashingReader, HashingWriter, atomic_write
from ._state_dict import abstract_model, leaf_key, named_parameters
from ._version import __version__


# File layout: MAGIC, the header length (u64 little-endian), the JSON header,
# the `eqx.tree_serialise_leaves` payload, then the SHA-256 of header and payload.
MAGIC = b"EQXVAE\x00\n"
FORMAT_VERSION = 1
_LENGTH = struct.Struct("<Q")
_DIGEST_SIZE = 32
_MAX_HEADER = 64 * 1024 * 1024


def save(path: str | os.PathLike[str], model: AutoencoderKL) -> None:
    """Writes `model` to one file: a JSON header (config, package and format versions,
    the name, shape and dtype of every parameter) followed by
    `eqx.tree_serialise_leaves` and a checksum.

    The file is written under a temporary name in the same directory and renamed
    into place, so a crash never leaves a half-written file at `path` (an existing
    file there stays intact until the new one is complete).

    **Arguments:**

    - `path`: where to write; conventionally ending in `.eqx`.
    - `model`: an [`eqx_vae.AutoencoderKL`][].
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"`model` must be an AutoencoderKL, got {type(model).__name__}.")
    header = {
        "format": "eqx_vae",
        "format_version": FORMAT_VERSION,
        "eqx_vae_version": __version__,
        "config": model.config.to_dict(),
        "parameters": [
            [name, list(leaf.shape), jnp.dtype(leaf.dtype).name]
            for name, leaf in named_parameters(model)
        ],
    }
    write_tree_file(path, MAGIC, header, model)


def write_tree_file(
    path: str | os.PathLike[str], magic: bytes, header: dict[str, Any], tree: Any
) -> None:
    """Writes `magic`, the JSON `header`, `eqx.tree_serialise_leaves(tree)` and a
    checksum to `path`, atomically."""
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    with atomic_write(path) as f:
        hasher = HashingWriter(f)
        hasher.write(magic)
        hasher.write(_LENGTH.pack(len(header_bytes)))
        hasher.write(header_bytes)
        eqx.tree_serialise_leaves(hasher, tree)
        f.write(hasher.digest())


def load(path: str | os.PathLike[str]) -> AutoencoderKL:
    """Reads a model written by [`eqx_vae.save`][].

    **Arguments:**

    - `path`: the file.

    **Returns:**

    The [`eqx_vae.AutoencoderKL`][], with the dtypes it was saved with.

    **Raises:**

    [`eqx_vae.CheckpointError`][] if the file is not an eqx_vae checkpoint, was written
    in another format version, does not match the model structure of this version
    of eqx_vae, or is damaged (truncated, or failing its checksum).
    """

    def skeleton(header: dict[str, Any], path: pathlib.Path) -> AutoencoderKL:
        _check_format(header, path, "eqx_vae", FORMAT_VERSION)
        config = _config_from_header(header, path)
        return _skeleton_from_header(header, config, path)

    model, _ = read_tree_file(path, MAGIC, skeleton, "an eqx_vae checkpoint")
    return model


def read_tree_file(
    path: str | os.PathLike[str],
    magic: bytes,
    skeleton: Any,
    what: str,
) -> tuple[Any, dict[str, Any]]:
    """Reads a file written by `write_tree_file`: checks `magic`, parses the header,
    asks `skeleton(header, path)` for the tree structure, reads the leaves and checks
    the checksum. Returns the tree and the header."""
    path = pathlib.Path(path)
    with open(path, "rb") as raw:
        f = HashingReader(raw)
        header = _read_header(f, path, magic, what)
        like = skeleton(header, path)
        try:
            tree = eqx.tree_deserialise_leaves(f, like)
        except Exception as e:
            raise CheckpointError(f"{path} is damaged: {_unreadable_leaf(e)}.") from e
        digest = f.digest()
        stored = raw.read(_DIGEST_SIZE)
        if len(stored) != _DIGEST_SIZE:
            raise CheckpointError(f"{path} is truncated: its checksum is missing.")
        if stored != digest:
            raise CheckpointError(f"{path} is damaged: its checksum does not match.")
        if raw.read(1):
            raise CheckpointError(f"{path} is damaged: it has data after its checksum.")
    return tree, header


def _unreadable_leaf(error: Exception) -> str:
    """What `eqx.tree_deserialise_leaves` failed on, with the parameter's dotted name
    (`decoder.mid_block.attentions.0.to_q.weight`): Equinox wraps the reader's error in
    errors whose `path` attribute is the pytree path, at every level of nesting."""
    path = None
    cause: BaseException | None = error
    while cause is not None and isinstance(getattr(cause, "path", None), tuple):
        path = cause.path  # pyright: ignore[reportAttributeAccessIssue]
        cause = cause.__cause__
    reason = error if cause is None else cause
    if path is None:
        return f"its parameters could not be read ({reason})"
    try:
        name = leaf_key(path)
    except TypeError:  # a pytree node that is not an attribute, a sequence or a dict
        name = jax.tree_util.keystr(path)
    return f"the parameter {name} could not be read ({reason})"


def _read_header(
    f: "HashingReader", path: pathlib.Path, magic: bytes, what: str
) -> dict[str, Any]:
    if f.read(len(magic)) != magic:
        raise CheckpointError(
            f"{path} is not {what} (it does not start with {magic!r}). For diffusers "
            "folders and single .safetensors files use the loaders for those formats."
        )
    length_bytes = f.read(_LENGTH.size)
    if len(length_bytes) != _LENGTH.size:
        raise CheckpointError(f"{path} is truncated inside its header.")
    (length,) = _LENGTH.unpack(length_bytes)
    if length > _MAX_HEADER:
        raise CheckpointError(f"{path} is damaged: its header claims {length} bytes.")
    header_bytes = f.read(length)
    if len(header_bytes) != length:
        raise CheckpointError(f"{path} is truncated inside its header.")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: its header is not valid JSON ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is damaged: its header is not a JSON object.")
    return header


def _check_format(header: dict[str, Any], path: pathlib.Path, kind: str, version: int) -> None:
    if header.get("format") != kind:
        raise CheckpointError(f"{path} is damaged: its header does not describe an {kind} file.")
    found = header.get("format_version")
    if found != version:
        raise CheckpointError(
            f"{path} was written in {kind} format version {found!r} (by eqx_vae "
            f"{header.get('eqx_vae_version', '?')}); this eqx_vae {__version__} reads "
            f"format version {version}."
        )


def _config_from_header(header: dict[str, Any], path: pathlib.Path) -> AutoencoderKLConfig:
    try:
        return AutoencoderKLConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: its config is invalid ({e}).") from e


def _skeleton_from_header(
    header: dict[str, Any], config: AutoencoderKLConfig, path: pathlib.Path
) -> AutoencoderKL:
    """The model structure this version builds for `config`, with each parameter's
    dtype taken from the file, after checking that the file's parameter names and
    shapes are exactly those of the structure (so that a reordered or renamed field can
    never load a parameter into the wrong place)."""
    try:
        recorded = [
            (str(n), tuple(int(d) for d in s), jnp.dtype(t)) for n, s, t in header["parameters"]
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: its parameter list is invalid ({e}).") from e
    skeleton = abstract_model(config)
    expected = [(name, tuple(leaf.shape)) for name, leaf in named_parameters(skeleton)]
    if [(n, s) for n, s, _ in recorded] != expected:
        recorded_names = {n: s for n, s, _ in recorded}
        expected_names = dict(expected)
        missing = sorted(set(expected_names) - set(recorded_names))
        extra = sorted(set(recorded_names) - set(expected_names))
        reshaped = sorted(
            n
            for n in set(expected_names) & set(recorded_names)
            if expected_names[n] != recorded_names[n]
        )
        raise CheckpointError(
            f"{path} does not match the AutoencoderKL structure of eqx_vae {__version__} "
            f"(written by eqx_vae {header.get('eqx_vae_version', '?')}): "
            f"missing {missing[:10]}, unexpected {extra[:10]}, reshaped {reshaped[:10]}"
            + ("" if missing or extra or reshaped else ", parameters in a different order")
            + "."
        )
    leaves, treedef = jax.tree_util.tree_flatten(skeleton)
    leaves = [
        jax.ShapeDtypeStruct(leaf.shape, t)
        for leaf, (_, _, t) in zip(leaves, recorded, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)
