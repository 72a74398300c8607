"""Reading and running the models that [`eqx_vae.export`][] writes, with nothing but
the standard library, NumPy and JAX.

This file imports nothing else (no eqx_vae, no Equinox), so that a server can copy it
alone next to an exported model and serve it:

    from _exported_reader import load_exported
    vae = load_exported("vae.zip")
    images = vae.decode(512)(latents)  # (B, 4, 64, 64) -> (B, 3, 512, 512)

The file format: a zip of `header.json` (see `FORMAT` and `FORMAT_VERSION`), the
parameters as `.npy` members (dtypes NumPy cannot store, such as bfloat16, as unsigned
integers of the same width, their dtype named in the header), and one
`jax.export.Exported.serialize()` artefact per program, each taking
`(parameters, x)` with a symbolic batch size `b`.
"""

import io
import os
import pathlib
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.export  # a submodule to import explicitly under older jax versions
import numpy as np


FORMAT = "eqx_vae.exported"
# The header fields and the members of the zip; raise it when either changes.
FORMAT_VERSION = 1
HEADER = "header.json"


class IncompatibleArtefactError(ValueError):
    """Raised by [`eqx_vae.load_exported`][] when an exported model cannot run here: it
    is not one, its format version is unknown to this reader, it holds no program for
    the platform this process runs on, or its programs use a `jax.export` calling
    convention that this version of JAX cannot run."""


class ExportedProgram:
    """One exported program: the encoder or the decoder for one image size, with a
    batch size of the caller's choosing. Call it on a batch.

    Each batch size is compiled once, on first use (or by `compile`), with the
    compiler options the exporter recommended for this platform.
    """

    method: str
    size: tuple[int, int]
    pixels: bool
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    compiler_options: dict[str, Any]

    def __init__(
        self,
        entry: dict[str, Any],
        exported: Any,
        parameters: list[jax.Array],
        compiler_options: dict[str, Any],
    ):
        self.method = entry["method"]
        self.size = (int(entry["size"][0]), int(entry["size"][1]))
        self.pixels = bool(entry["pixels"])
        self.input_shape = tuple(int(n) for n in entry["input"]["shape"][1:])
        self.input_dtype = np.dtype(jax.numpy.dtype(entry["input"]["dtype"]))
        self.compiler_options = dict(compiler_options)
        self._exported = exported
        self._parameters = parameters
        self._executables: dict[int, Any] = {}

    def compile(self, batch: int) -> None:
        """Compiles the program for batches of `batch` inputs now (it is otherwise
        compiled on the first call with that batch size), to take compilation off the
        request path."""
        if batch in self._executables:
            return
        x = jax.ShapeDtypeStruct((batch, *self.input_shape), self.input_dtype)
        lowered = jax.jit(self._exported.call).lower(self._parameters, x)
        try:
            executable = lowered.compile(compiler_options=self.compiler_options)
        except Exception as error:  # an option this jaxlib does not know
            if not self.compiler_options:
                raise
            warnings.warn(
                f"Compiling without the recommended compiler options "
                f"{self.compiler_options}, which this jaxlib rejects: {error}",
                stacklevel=2,
            )
            self.compiler_options = {}
            executable = lowered.compile()
        self._executables[batch] = executable

    def __call__(self, x: Any) -> Any:
        """Runs the program on a batch.

        **Arguments:**

        - `x`: a batch of inputs, of shape `(batch, *input_shape)` and dtype
            `input_dtype`: images `(B, C, H, W)` in `[-1, 1]` (or 8-bit pixels
            `(B, H, W, C)` when `pixels`) for the encoder, latents `(B, C, h, w)` for
            the decoder. A NumPy array is copied to the device first.

        **Returns:**

        For the encoder, the posterior's `(mean, logvar)`, each `(B, C, h, w)`; for the
        decoder, the images `(B, C, H, W)` (or 8-bit pixels `(B, H, W, C)` when
        `pixels`).
        """
        shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
        if len(shape) < 1 or shape[1:] != self.input_shape or dtype != self.input_dtype:
            expected = ("batch", *self.input_shape)
            raise ValueError(
                f"This {self.method} program for {self.size[0]}x{self.size[1]} images takes "
                f"inputs of shape {expected} and dtype {self.input_dtype}, got shape {shape} "
                f"and dtype {dtype}. Pick the program exported for this size, and convert "
                f"the input with `.astype({self.input_dtype.name})`."
            )
        batch = shape[0]
        self.compile(batch)
        return self._executables[batch](self._parameters, x)

    def __repr__(self) -> str:
        return (
            f"ExportedProgram({self.method}, size={self.size}, "
            f"input=(b, {', '.join(map(str, self.input_shape))}) {self.input_dtype}, "
            f"pixels={self.pixels})"
        )


class ExportedModel:
    """An exported model, read by [`eqx_vae.load_exported`][]: its parameters on the
    device and its programs, one per method and image size.

    !!! Example

        ```python
        vae = eqx_vae.load_exported("vae.zip")
        mean, logvar = vae.encode(512)(images)  # (B, 3, 512, 512) -> 2 x (B, 4, 64, 64)
        images = vae.decode(512)(mean)
        ```
    """

    header: dict[str, Any]
    programs: tuple[ExportedProgram, ...]
    parameters: list[jax.Array]

    def __init__(
        self,
        header: dict[str, Any],
        programs: Sequence[ExportedProgram],
        parameters: list[jax.Array],
    ):
        self.header = header
        self.programs = tuple(programs)
        self.parameters = parameters

    @property
    def config(self) -> dict[str, Any]:
        """The model's config, as diffusers writes it to `config.json`."""
        return self.header["config"]

    def program(self, method: str, size: int | Sequence[int]) -> ExportedProgram:
        """The program of `method` (`"encode"` or `"decode"`) for images of `size`: an
        int for square images, or `(height, width)`, in pixels."""
        wanted = (size, size) if isinstance(size, int) else tuple(size)
        for program in self.programs:
            if program.method == method and program.size == wanted:
                return program
        have = sorted(f"{p.size[0]}x{p.size[1]}" for p in self.programs if p.method == method)
        raise ValueError(
            f"No {method} program for {wanted[0]}x{wanted[1]} images was exported; there "
            f"are {method} programs for {', '.join(have) if have else 'no size'}. Export "
            "one for this size (`eqx_vae.export(..., resolutions=...)`)."
        )

    def encode(self, size: int | Sequence[int]) -> ExportedProgram:
        """The encoder for images of `size` (an int for square images, or `(height,
        width)`): images `(B, C, H, W)` to the posterior's `(mean, logvar)`."""
        return self.program("encode", size)

    def decode(self, size: int | Sequence[int]) -> ExportedProgram:
        """The decoder for images of `size` (an int for square images, or `(height,
        width)`): latents `(B, C, H / f, W / f)` to images."""
        return self.program("decode", size)

    def __repr__(self) -> str:
        programs = ", ".join(f"{p.method} {p.size[0]}x{p.size[1]}" for p in self.programs)
        return f"ExportedModel({programs}; platforms {self.header['platforms']})"


def load_exported(path: str | os.PathLike[str]) -> ExportedModel:
    """Reads a model written by [`eqx_vae.export`][], to run its programs with JAX
    alone.

    This function lives in one file that imports only the standard library, NumPy and
    JAX (`eqx_vae/_exported_reader.py`): a server that has no eqx_vae or Equinox can
    copy that file and import `load_exported` from it.

    **Arguments:**

    - `path`: the file.

    **Returns:**

    An [`eqx_vae.ExportedModel`][]: `model.decode(512)(latents)`, `model.encode((512,
    768))(images)`. Its parameters are copied to JAX's default device; each program is
    compiled for a batch size on first use, with the compiler options recorded for
    this platform.

    **Raises:**

    [`eqx_vae.IncompatibleArtefactError`][] when the file is not an exported model,
    its format version is unknown here, none of its platforms is the one this process
    runs on, or this JAX cannot run its calling-convention version; the message says
    what to do (re-export with this JAX, or run on one of its platforms).
    """
    import json

    path = pathlib.Path(path)
    with zipfile.ZipFile(path) as archive:
        if HEADER not in archive.namelist():
            raise IncompatibleArtefactError(
                f"{path} is not a model written by `eqx_vae.export` (it has no {HEADER})."
            )
        header = json.loads(archive.read(HEADER))
        platform = check_compatible(header, path)
        parameters = [_read_parameter(archive, entry) for entry in header["parameters"]]
        options = header.get("compiler_options", {}).get(platform, {})
        programs = [
            ExportedProgram(
                entry,
                jax.export.deserialize(bytearray(archive.read(entry["member"]))),
                parameters,
                options,
            )
            for entry in header["programs"]
        ]
    return ExportedModel(header, programs, parameters)


def check_compatible(header: dict[str, Any], path: pathlib.Path) -> str:
    """Raises `IncompatibleArtefactError` unless this process can run the programs that
    `header` describes; returns the platform it runs them on."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IncompatibleArtefactError(
            f"{path} is not a model written by `eqx_vae.export` (its header's format is "
            f"{header.get('format') if isinstance(header, dict) else None!r}, not {FORMAT!r})."
        )
    exported_with = f"eqx_vae {header.get('eqx_vae_version')}, jax {header.get('jax_version')}"
    running = f"jax {jax.__version__}"
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise IncompatibleArtefactError(
            f"{path} is in format version {version} of eqx_vae's exported models (written "
            f"by {exported_with}); this reader ({running}) reads version {FORMAT_VERSION}. "
            "Re-export the model with this version of eqx_vae, or read it with the "
            "version of eqx_vae that wrote it."
        )
    platform = jax.export.default_export_platform()
    platforms = list(header.get("platforms", []))
    if platform not in platforms:
        raise IncompatibleArtefactError(
            f"{path} holds programs for {', '.join(platforms)} (exported with "
            f"{exported_with}); this process runs on {platform} ({running}). Run it on "
            f"one of {', '.join(platforms)}, or re-export it with platforms that include "
            f"{platform!r}."
        )
    convention = header.get("calling_convention_version")
    low = jax.export.minimum_supported_calling_convention_version
    high = jax.export.maximum_supported_calling_convention_version
    if not isinstance(convention, int) or not low <= convention <= high:
        raise IncompatibleArtefactError(
            f"{path} was exported with {exported_with}, in jax.export calling convention "
            f"version {convention}; this process runs {running}, which supports versions "
            f"{low} to {high}. Re-export the model with jax {jax.__version__} "
            f"(`eqx_vae.export` or `eqx-vae export`), or run it with jax "
            f"{header.get('jax_version')}."
        )
    return platform


def _read_parameter(archive: zipfile.ZipFile, entry: dict[str, Any]) -> jax.Array:
    """A parameter stored as `.npy`; dtypes NumPy has no name for in `.npy` files
    (bfloat16, float8) are stored as unsigned integers of the same width."""
    array = np.load(io.BytesIO(archive.read(entry["member"])), allow_pickle=False)
    dtype = np.dtype(jax.numpy.dtype(entry["dtype"]))
    if array.dtype != dtype:
        array = array.view(dtype)
    if list(array.shape) != list(entry["shape"]):
        raise IncompatibleArtefactError(
            f"The parameter {entry['name']} ({entry['member']}) has shape "
            f"{list(array.shape)}, but the header says {entry['shape']}: the file is damaged."
        )
    return jax.device_put(array)
