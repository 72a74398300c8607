"""Files written whole or not at all, and read or written through a checksum."""

import contextlib
import hashlib
import io
import os
import pathlib
import tempfile
from typing import Any, BinaryIO

from ._errors import CheckpointError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]):
    """Opens a temporary file next to `path` for binary writing, and renames it to
    `path` only once the block has finished without an exception (after flushing it
    to disk). On an exception the temporary file is removed and `path` is untouched."""
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file private to its owner; give it the usual permissions.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class HashingWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._hash.update(data)
        self._f.write(data)
        return len(data)

    def digest(self) -> bytes:
        return self._hash.digest()


class HashingReader(io.RawIOBase):
    """Hashes every byte of a seekable file once, in order, however often `np.load`
    seeks back to read a part again."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = hashlib.sha256()
        self._hashed_to = f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, size: int | None = -1) -> bytes:
        start = self._f.tell()
        if start > self._hashed_to:
            raise CheckpointError("Internal error: a checkpoint was read out of order.")
        data = self._f.read(-1 if size is None else size)
        end = start + len(data)
        if end > self._hashed_to:
            self._hash.update(data[self._hashed_to - start :])
            self._hashed_to = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def digest(self) -> bytes:
        return self._hash.digest()
