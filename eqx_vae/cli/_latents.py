"""`eqx-vae encode IN OUT` and `eqx-vae decode IN OUT`: images to latents in
safetensors files and back."""

import argparse
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import CheckpointError
from ..interop._safetensors import SafetensorsFile, write_safetensors
from ._checks import TILE_HELP, ArgumentProblems
from ._common import (
    IMAGE_SUFFIXES,
    Runner,
    add_model_arguments,
    compute_dtype,
    exit_status,
    load_model,
    pairs,
    read_image,
    run_jobs,
    write_image,
)


LATENTS = "latents"


def add_parsers(commands: Any) -> None:
    encode = commands.add_parser(
        "encode",
        help="encode images to latents (.safetensors)",
        description=(
            "Encode an image (or a folder of them) to a latent stored in a .safetensors file "
            f"under the name {LATENTS!r}, shape (1, C, h, w), scaled as a diffusion model sees "
            "it (the model's scaling_factor and shift, or for FLUX.2 its 2x2 patches "
            "normalised by its BatchNorm statistics, (1, 4C, h/2, w/2); --raw for the "
            "unscaled latent). The file's metadata records the scaling and the image size."
        ),
    )
    encode.add_argument("input", type=pathlib.Path, metavar="IN")
    encode.add_argument("output", type=pathlib.Path, metavar="OUT")
    add_model_arguments(encode)
    encode.add_argument(
        "--sample",
        type=int,
        metavar="SEED",
        help="draw a posterior sample with this seed instead of taking the mode",
    )
    encode.add_argument("--raw", action="store_true", help="store the latent unscaled")
    encode.add_argument("--tile", type=int, metavar="PX", help=TILE_HELP)
    encode.set_defaults(run=run_encode)

    decode = commands.add_parser(
        "decode",
        help="decode latents (.safetensors) to images",
        description=(
            "Decode latents written by `eqx-vae encode` (or any .safetensors file with a "
            f"{LATENTS!r} tensor of shape (C, h, w) or (1, C, h, w), scaled per the model's "
            "convention unless its metadata says raw; FLUX.2's scaled latents have 4C "
            "channels) to images."
        ),
    )
    decode.add_argument("input", type=pathlib.Path, metavar="IN")
    decode.add_argument("output", type=pathlib.Path, metavar="OUT")
    add_model_arguments(decode)
    decode.add_argument("--tile", type=int, metavar="PX", help=TILE_HELP)
    decode.set_defaults(run=run_decode)


def run_encode(args: argparse.Namespace) -> int:
    problems = ArgumentProblems()
    problems.tile(args.tile)
    problems.seed("--sample", args.sample)
    problems.raise_if_any()
    jobs = pairs(args.input, args.output, IMAGE_SUFFIXES, ".safetensors")
    model = load_model(args)
    runner = Runner(model, compute_dtype(args), args.tile)
    indices = {source: index for index, (source, _) in enumerate(jobs)}

    def encode(source: pathlib.Path, destination: pathlib.Path) -> tuple[str, dict]:
        image = read_image(source)
        posterior = runner.encode(image)
        if args.sample is None:
            z = posterior.mode()
        else:
            key = jax.random.fold_in(jax.random.key(args.sample), indices[source])
            z = posterior.sample(key)
        if not args.raw:
            z = model.scale_latents(z)
        metadata = {
            "format": "eqx_vae.latents",
            "scaled": json.dumps(not args.raw),
            "image_size": json.dumps(list(image.shape[1:])),
            "scaling": json.dumps(_scaling(model)),
        }
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(
            destination, {LATENTS: np.asarray(z, np.float32)[None]}, metadata=metadata
        )
        return f"{source} -> {destination}: latent {tuple(z.shape)}", {}

    failures = run_jobs(jobs, "encoding", encode)
    return exit_status(args.command, failures, len(jobs), "images")


def run_decode(args: argparse.Namespace) -> int:
    problems = ArgumentProblems()
    problems.tile(args.tile)
    if not args.input.is_dir():
        problems.image_output(args.output)
    problems.raise_if_any()
    jobs = pairs(args.input, args.output, (".safetensors",), ".png")
    model = load_model(args)
    runner = Runner(model, compute_dtype(args), args.tile)

    def decode(source: pathlib.Path, destination: pathlib.Path) -> tuple[str, dict]:
        z, metadata = _read_latent(source)
        scaled = json.loads(metadata.get("scaled", "true"))
        channels = model.config.scaled_latent_channels if scaled else model.latent_channels
        if z.shape[0] != channels:
            raise ValueError(
                f"{source}: the latent has shape {z.shape}; this model decodes "
                f"{'scaled' if scaled else 'raw'} latents of shape ({channels}, h, w)."
            )
        if scaled:
            z = np.asarray(model.unscale_latents(jnp.asarray(z)))
        image = runner.decode(z)
        if "image_size" in metadata:
            h, w = json.loads(metadata["image_size"])
            image = image[:, :h, :w]
        write_image(destination, image)
        return f"{source} -> {destination}: image {image.shape[1]}x{image.shape[2]}", {}

    failures = run_jobs(jobs, "decoding", decode)
    return exit_status(args.command, failures, len(jobs), "latents")


def _scaling(model: Any) -> dict[str, Any]:
    c = model.config
    if c.patch_size is not None:
        return {"patch_size": list(c.patch_size), "batch_norm_eps": c.batch_norm_eps}
    return {
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "latents_mean": c.latents_mean,
        "latents_std": c.latents_std,
    }


def _read_latent(path: pathlib.Path) -> tuple[np.ndarray, dict[str, str]]:
    try:
        with SafetensorsFile(path) as f:
            if LATENTS not in f:
                raise ValueError(
                    f"{path} holds no tensor named {LATENTS!r} (it has: {', '.join(f) or 'none'})."
                )
            z = np.asarray(f[LATENTS].read(), np.float32)
            metadata = dict(f.metadata)
    except CheckpointError as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e
    if z.ndim == 4 and z.shape[0] == 1:
        z = z[0]
    if z.ndim != 3:
        raise ValueError(f"{path}: the latent has shape {z.shape}; expected (C, h, w).")
    return z, metadata
