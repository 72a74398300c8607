"""What the `eqx-vae` commands share: loading a model from any source, reading and
writing images, running the autoencoder on images of any size."""

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._autoencoder import AutoencoderKL
from .._builtin import BUILTIN_PATH
from .._config import PRESETS
from .._distribution import DiagonalGaussian
from .._errors import CheckpointError
from .._images import (
    IMAGE_SUFFIXES as IMAGE_SUFFIXES,
    read_image as read_image,
    write_image as write_image,
)
from .._progress import Progress
from .._serving import Codec
from .._tiling import tiled_decode, tiled_encode
from .._xla import compiler_options
from ._convert import BUILTIN, DTYPES, load_any, parameter_count


SAMPLE_IMAGE = BUILTIN_PATH.parent / "chelsea.png"


MODEL_HELP = (
    "an eqx_vae checkpoint (.eqx), a diffusers folder, an original single file, a Hugging "
    f"Face Hub id, or {BUILTIN} for the built-in model (the default; a file or folder named "
    f"{BUILTIN} is ./{BUILTIN})"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="the model family of a single-file MODEL (its latent scaling is not in the file)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="compute dtype (the parameters' by default)"
    )


def model_name(args: argparse.Namespace) -> str:
    """How to call the model `--model` names."""
    return "built-in" if args.model in (None, BUILTIN) else args.model


def load_model(args: argparse.Namespace) -> AutoencoderKL:
    """The model `--model` names: the built-in model (by default, or as `builtin`), a
    local file or folder of any kind, or a Hub id."""
    if args.model is None or args.model == BUILTIN:
        return load_any(BUILTIN)[0]
    path = pathlib.Path(args.model)
    if path.exists():
        return load_any(path, preset=args.preset)[0]
    if path.suffix or args.model.count("/") != 1:  # not an `owner/name` Hub id
        raise FileNotFoundError(f"The model {args.model} does not exist.")
    from ..interop import from_pretrained

    return from_pretrained(args.model)


def compute_dtype(args: argparse.Namespace) -> Any:
    return None if args.dtype is None else DTYPES[args.dtype]


def pairs(
    source: pathlib.Path, destination: pathlib.Path, suffixes: tuple[str, ...], out_suffix: str
) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """`(input, output)` paths: one file to one file, or every file with one of
    `suffixes` in a folder to the same name (with `out_suffix`) in another."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise ValueError(f"{source} holds no files ending in {', '.join(suffixes)}.")
        return [(p, destination / (p.stem + out_suffix)) for p in files]
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist.")
    return [(source, destination)]


def run_jobs(
    jobs: list[tuple[pathlib.Path, pathlib.Path]],
    description: str,
    work: Callable[[pathlib.Path, pathlib.Path], tuple[str, dict[str, Any]]],
) -> list[str]:
    """Runs `work(source, destination)` on every job; it returns a line to print and
    values for the progress bar, which is shown instead of the lines when there is
    more than one job. A job that fails with an error the command line reports (a
    file that cannot be read or written) does not stop the others: the failures are
    returned, as `source: error` lines. A single job's error is raised."""
    bar = Progress(len(jobs), description) if len(jobs) > 1 else None
    failures = []
    for source, destination in jobs:
        try:
            line, values = work(source, destination)
        except (CheckpointError, ValueError, OSError) as e:
            if bar is None:
                raise
            failures.append(f"{source}: {e}")
            bar.update(1)
            continue
        if bar is None:
            print(line)
        else:
            bar.update(1, **values)
    return failures


def exit_status(command: str, failures: list[str], total: int, what: str) -> int:
    """Lists the failures of `run_jobs` on stderr; the exit status: 1 if any."""
    if not failures:
        return 0
    print(f"eqx-vae {command}: error: {len(failures)} of {total} {what} failed:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1


class Runner:
    """Encoding and decoding of single images of any size with a loaded model: through
    the few programs of an `eqx_vae.Codec` (one per bucket shape, exact), or, when
    `tile` is given, tile by tile, compiled once per shape. Images are edge-padded to
    the spatial factor and cropped back."""

    def __init__(self, model: AutoencoderKL, dtype: Any = None, tile: int | None = None):
        self.model = model
        self.tile = tile
        self.codec = None if tile is not None else Codec(model, dtype=dtype)
        if tile is not None:
            options = compiler_options()
            self._encode: Callable = eqx.filter_jit(  # pyright: ignore[reportCallIssue]
                lambda m, x: tiled_encode(m, x, tile_size=tile, dtype=dtype),
                compiler_options=options,
            )
            self._decode: Callable = eqx.filter_jit(  # pyright: ignore[reportCallIssue]
                lambda m, z: tiled_decode(m, z, tile_size=tile, dtype=dtype),
                compiler_options=options,
            )

    def encode(self, image: np.ndarray) -> DiagonalGaussian:
        """The posterior of an image `(C, H, W)`; edges padded up to a multiple of the
        spatial factor times FLUX.2's latent patch (so that the latent can be scaled;
        the latent covers the padded image)."""
        channels = self.model.in_channels
        if image.shape[0] != channels:
            raise ValueError(
                f"The model encodes {channels}-channel images, got {image.shape[0]} channels."
            )
        if self.codec is not None:
            return self.codec.encode(image)
        ph, pw = self.model.config.latent_patch
        fh, fw = self.model.spatial_factor * ph, self.model.spatial_factor * pw
        _, h, w = image.shape
        padded = np.pad(image, ((0, 0), (0, -h % fh), (0, -w % fw)), mode="edge")
        return self._encode(self.model, jnp.asarray(padded))

    def decode(self, z: Any) -> np.ndarray:
        """The image `(C, H, W)` of a latent, as float32."""
        if self.codec is not None:
            return np.asarray(self.codec.decode(z), np.float32)
        return np.asarray(self._decode(self.model, jnp.asarray(z)), np.float32)

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        _, h, w = image.shape
        return self.decode(self.encode(image).mode())[:, :h, :w]


def describe(model: AutoencoderKL) -> str:
    c = model.config
    return (
        f"{parameter_count(model):,} parameters ({model.dtype}), spatial factor "
        f"{model.spatial_factor}, {c.latent_channels} latent channels"
    )
