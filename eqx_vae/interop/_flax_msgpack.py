"""diffusers' Flax weights, `diffusion_flax_model.msgpack`, read and written with the
`msgpack` package alone (the `flax` extra), without flax.

The layout is flax.serialization's: nested msgpack maps from module names to their
parameters. An array is a msgpack extension of type 1 whose data is itself a msgpack
array `[shape, dtype name, bytes]` (C order, little-endian); type 3 is a NumPy scalar in
the same form and type 2 a Python complex number `[real, imag]`. An array of more than
1 GiB is stored as a map `{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...},
"chunks": {"0": flat piece, ...}}`, because msgpack cannot hold one object of 2 GiB.

A damaged array (an undecodable record, an unknown dtype, a byte count that does not
match its shape) is kept as a `DamagedArray` and reported with every other problem of the
file; a file that is not msgpack at all raises `CheckpointError` at once."""

import math
import mmap
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from .._errors import CheckpointError
from .._files import atomic_write
from .._flax_params import DamagedArray


FLAX_WEIGHTS_NAME = "diffusion_flax_model.msgpack"

_NDARRAY = 1
_COMPLEX = 2
_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"
# flax's limit: msgpack holds at most 2**31 - 1 bytes in one object.
_MAX_CHUNK_BYTES = 2**30
# A tree nested deeper than this is damaged, not a model's.
_MAX_DEPTH = 32
# The most dimensions every supported NumPy allows (NumPy 2 allows 64).
_MAX_DIMENSIONS = 32

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    )
}
_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise CheckpointError(
            f"Reading or writing diffusers' Flax weights ({FLAX_WEIGHTS_NAME}) needs the "
            "msgpack package: `pip install 'eqx_vae[flax]'`."
        ) from None
    return msgpack


def read_flax_msgpack(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a file written by `flax.serialization.to_bytes` (as diffusers'
    `FlaxModelMixin.save_pretrained` writes `diffusion_flax_model.msgpack`).

    **Arguments:**

    - `path`: the file.

    **Returns:**

    Its tree: nested dicts of NumPy arrays (and any other values the file holds), with
    a `DamagedArray` for every array that cannot be decoded.

    **Raises:**

    `CheckpointError` for a file that cannot be read, is not msgpack, is truncated, or
    does not hold a map.
    """
    msgpack = _msgpack()
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError(f"{path} is empty; it is not a Flax msgpack file.")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                tree = msgpack.unpackb(
                    data, ext_hook=_decode_extension, raw=False, strict_map_key=False
                )
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path} is truncated, damaged or not a Flax msgpack file ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path} does not hold a map of parameters but a {type(tree).__name__}; it is "
            "not a Flax parameter file."
        )
    return _join_chunks(tree, 0)


def _decode_extension(code: int, data: bytes) -> Any:
    if code in (_NDARRAY, _NPSCALAR):
        array = _decode_array(data)
        if code == _NPSCALAR and isinstance(array, np.ndarray):
            return array[()]
        return array
    if code == _COMPLEX:
        value = _unpack_record(data)
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(part, float) for part in value)
        ):
            return complex(value[0], value[1])
        return DamagedArray("a damaged complex number")
    return DamagedArray(f"a msgpack extension of unknown type {code}")


def _unpack_record(data: bytes) -> Any:
    msgpack = _msgpack()
    try:
        return msgpack.unpackb(data, raw=True)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        return DamagedArray(f"an undecodable array record ({type(e).__name__}: {e})")


def _decode_array(data: bytes) -> np.ndarray | DamagedArray:
    record = _unpack_record(data)
    if isinstance(record, DamagedArray):
        return record
    if not (isinstance(record, list) and len(record) == 3):
        return DamagedArray("a damaged array record (not [shape, dtype, data])")
    shape, name, raw = record
    if not _is_shape(shape):
        return DamagedArray(f"an array with the invalid shape {shape!r}")
    dtype = _DTYPES.get(name.decode("ascii", "replace")) if isinstance(name, bytes) else None
    if dtype is None:
        return DamagedArray(f"an array of the unknown dtype {name!r}")
    if not isinstance(raw, bytes):
        return DamagedArray("an array whose data is not a byte string")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        return DamagedArray(
            f"an array of shape {tuple(shape)} and dtype {dtype.name} with {len(raw)} bytes "
            f"of data instead of {expected}"
        )
    return np.frombuffer(raw, dtype).reshape(shape)


def _is_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMENSIONS
        and all(type(d) is int and d >= 0 for d in shape)  # a bool is not a size
    )


def _join_chunks(node: dict[Any, Any], depth: int) -> dict[Any, Any]:
    """The tree with every chunked array joined into one, in place."""
    for key, value in node.items():
        if not isinstance(value, dict):
            continue
        if depth >= _MAX_DEPTH:
            node[key] = DamagedArray(f"a map nested more than {_MAX_DEPTH} levels deep")
        elif _CHUNKED in value:
            node[key] = _join(value)
        else:
            _join_chunks(value, depth + 1)
    return node


def _join(chunked: dict[Any, Any]) -> np.ndarray | DamagedArray:
    shape = _sequence(chunked.get("shape"))
    chunks = _sequence(chunked.get("chunks"))
    damaged = DamagedArray("a damaged chunked array")
    if shape is None or chunks is None or not chunks:
        return damaged
    if not _is_shape(shape):
        return damaged
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
        return damaged
    if len({c.dtype for c in chunks}) != 1 or sum(c.size for c in chunks) != math.prod(shape):
        return damaged
    return np.concatenate(chunks).reshape(shape)


def _sequence(value: Any) -> list[Any] | None:
    """flax's `{"0": a, "1": b, ...}` as `[a, b, ...]`."""
    if not isinstance(value, dict) or set(value) != {str(i) for i in range(len(value))}:
        return None
    return [value[str(i)] for i in range(len(value))]


def write_flax_msgpack(path: str | os.PathLike[str], tree: Mapping[str, Any]) -> None:
    """Writes nested mappings of NumPy arrays as `flax.serialization.to_bytes` does,
    atomically (to a temporary name first, then renamed).

    **Arguments:**

    - `path`: the file.
    - `tree`: nested mappings with string keys and NumPy arrays as leaves.
    """
    msgpack = _msgpack()

    def encode(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            record = (list(value.shape), value.dtype.name, _little_endian(value).tobytes())
            return msgpack.ExtType(_NDARRAY, msgpack.packb(record, use_bin_type=True))
        raise TypeError(f"Cannot write a {type(value).__name__} to a Flax msgpack file.")

    data = msgpack.packb(_chunked(tree), default=encode, use_bin_type=True)
    with atomic_write(path) as f:
        f.write(data)


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.name not in _DTYPES:
        raise ValueError(f"Cannot write an array of dtype {array.dtype} to a Flax msgpack file.")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _chunked(tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _chunked(value)
            continue
        value = np.asarray(value)
        if value.nbytes <= _MAX_CHUNK_BYTES:
            out[key] = value
            continue
        flat = value.reshape(-1)
        size = max(1, _MAX_CHUNK_BYTES // value.dtype.itemsize)
        pieces = [flat[i : i + size] for i in range(0, flat.size, size)]
        out[key] = {
            _CHUNKED: True,
            "shape": {str(i): d for i, d in enumerate(value.shape)},
            "chunks": {str(i): piece for i, piece in enumerate(pieces)},
        }
    return out
