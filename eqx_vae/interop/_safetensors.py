"""Reading and writing `.safetensors` files with NumPy alone, strictly.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and `[begin, end)` byte range in the data that follows, and the
data. Every claim the header makes is checked against the file before any tensor is
read, so a truncated file or a header that lies about sizes raises `CheckpointError`
instead of returning garbage.
"""

import io
import json
import math
import os
import pathlib
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from .._errors import CheckpointError
from .._files import atomic_write
from .._host_arrays import aligned_empty


_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_LENGTH = struct.Struct("<Q")
# The reference implementation refuses headers over 100 MB.
_MAX_HEADER = 100 * 1024 * 1024


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes that starts with `head` (its first 9 bytes or
    more) is laid out as a safetensors file: a header length that fits in the file,
    then a JSON object. Says nothing about whether the rest is intact."""
    if len(head) <= _LENGTH.size:
        return False
    (length,) = _LENGTH.unpack(head[: _LENGTH.size])
    return 2 <= length <= min(_MAX_HEADER, size - _LENGTH.size) and head[8:9] == b"{"


class TensorRef:
    """A tensor in an open safetensors file: its shape and dtype are known from the
    header, its data is read on `read()` (or `np.asarray`) into a new array."""

    __slots__ = ("_begin", "_end", "_file", "dtype", "name", "shape")

    def __init__(
        self,
        file: "SafetensorsFile",
        name: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        begin: int,
        end: int,
    ):
        self._file = file
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self._begin = begin
        self._end = end

    @property
    def nbytes(self) -> int:
        return self._end - self._begin

    def read(self) -> np.ndarray:
        """Reads the tensor into a new, writable array that nothing else references."""
        return self._file.read_range(self.name, self._begin, self._end, self.dtype, self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, {self.dtype}, {self.shape})"


class SafetensorsFile(Mapping[str, TensorRef]):
    """An open `.safetensors` file: a read-only mapping from tensor names to
    [`eqx_vae.interop.TensorRef`][]s. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        self._f: io.FileIO = open(self.path, "rb", buffering=0)  # noqa: SIM115 (see close())
        try:
            self.metadata, self._tensors = self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorRef]]:
        path = self.path
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(_LENGTH.size)
        if len(head) != _LENGTH.size:
            raise CheckpointError(f"{path} is not a safetensors file: it has only {size} bytes.")
        (length,) = _LENGTH.unpack(head)
        if length > min(_MAX_HEADER, size - _LENGTH.size):
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {length} "
                f"bytes but the file has {size}."
            )
        raw = self._f.read(length)
        if len(raw) != length:
            raise CheckpointError(f"{path} is truncated inside its safetensors header.")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a damaged safetensors header ({e}).") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a damaged safetensors header (not an object).")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{path} has damaged safetensors metadata: {metadata!r}.")
        data_start = _LENGTH.size + length
        data_size = size - data_start
        tensors: dict[str, TensorRef] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, info in header.items():
            dtype, shape, begin, end = _parse_entry(path, name, info)
            if not 0 <= begin <= end <= data_size:
                raise CheckpointError(
                    f"{path} is truncated or damaged: tensor {name!r} claims bytes "
                    f"[{begin}, {end}) of a {data_size}-byte data section."
                )
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected:
                raise CheckpointError(
                    f"{path} is damaged: tensor {name!r} of dtype {_NAMES[dtype]} and shape "
                    f"{list(shape)} needs {expected} bytes but its header gives {end - begin}."
                )
            ranges.append((begin, end, name))
            tensors[name] = TensorRef(
                self, name, dtype, shape, data_start + begin, data_start + end
            )
        position = 0
        for begin, end, name in sorted(ranges):
            if begin != position:
                what = "overlaps another" if begin < position else "leaves a gap before it"
                raise CheckpointError(f"{path} is damaged: tensor {name!r} {what}.")
            position = end
        if position != data_size:
            raise CheckpointError(
                f"{path} is damaged: its tensors cover {position} bytes but the data section "
                f"has {data_size}."
            )
        return metadata, tensors

    def read_range(
        self, name: str, begin: int, end: int, dtype: np.dtype, shape: tuple[int, ...]
    ) -> np.ndarray:
        buffer = aligned_empty((end - begin,), np.uint8)
        view = memoryview(buffer.data)
        self._f.seek(begin)
        filled = 0
        while filled < len(view):  # one read returns at most ~2 GiB
            count = self._f.readinto(view[filled:])
            if not count:
                raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}.")
            filled += count
        return buffer.view(dtype).reshape(shape)

    def __getitem__(self, name: str) -> TensorRef:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_entry(
    path: pathlib.Path, name: str, info: Any
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    try:
        dtype_name = info["dtype"]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a damaged header entry for {name!r}: {info!r}.") from e
    if dtype_name not in _DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}, which eqx_vae does not read "
            f"(known: {sorted(_DTYPES)})."
        )
    for value in (*shape, begin, end):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path} has a damaged header entry for {name!r}: {info!r}.")
    return _DTYPES[dtype_name], shape, begin, end


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` (name -> array) to a `.safetensors` file, atomically (to a
    temporary name first, then renamed)."""
    arrays = {name: np.asarray(value) for name, value in tensors.items()}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in arrays.items():
        if array.dtype not in _NAMES:
            raise ValueError(
                f"Cannot write tensor {name!r} of dtype {array.dtype} to safetensors."
            )
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section, as the reference writer does
    with atomic_write(path) as f:
        f.write(_LENGTH.pack(len(raw)))
        f.write(raw)
        for array in arrays.values():
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
