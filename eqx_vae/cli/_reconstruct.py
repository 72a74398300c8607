"""`eqx-vae reconstruct [IN] [OUT]`: encode and decode images, report PSNR and SSIM."""

import argparse
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..metrics import bicubic_baseline, psnr, ssim
from ._checks import TILE_HELP, ArgumentProblems
from ._common import (
    IMAGE_SUFFIXES,
    SAMPLE_IMAGE,
    Runner,
    add_model_arguments,
    compute_dtype,
    describe,
    exit_status,
    load_model,
    model_name,
    pairs,
    read_image,
    run_jobs,
    write_image,
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "reconstruct",
        help="encode and decode images; print PSNR and SSIM",
        description=(
            "Encode images to latents (the posterior mode) and decode them back, writing the "
            "reconstructions and printing PSNR and SSIM against the inputs, next to bicubic "
            "down- and up-sampling that keeps as many values as the latent. IN and OUT are "
            "two image files or two folders."
        ),
    )
    parser.add_argument(
        "input",
        nargs="?",
        type=pathlib.Path,
        default=SAMPLE_IMAGE,
        metavar="IN",
        help="an image or a folder of images (a sample photograph by default)",
    )
    parser.add_argument(
        "output",
        nargs="?",
        type=pathlib.Path,
        default=pathlib.Path("reconstruction.png"),
        metavar="OUT",
        help="where to write (reconstruction.png by default)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--compare", action="store_true", help="write the input and output side by side"
    )
    parser.add_argument("--tile", type=int, metavar="PX", help=TILE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    problems = ArgumentProblems()
    problems.tile(args.tile)
    if not args.input.is_dir():
        problems.image_output(args.output)
    else:
        problems.check(
            not args.output.suffix, "OUT", args.output, "IN is a folder, so OUT must be one too"
        )
    problems.raise_if_any()
    jobs = pairs(args.input, args.output, IMAGE_SUFFIXES, ".png")
    model = load_model(args)
    print(f"model: {model_name(args)}, {describe(model)}")
    runner = Runner(model, compute_dtype(args), args.tile)
    scores = []

    def reconstruct(source: pathlib.Path, destination: pathlib.Path) -> tuple[str, dict]:
        image = read_image(source)
        recon = np.clip(runner.reconstruct(image), -1.0, 1.0)
        latent_values = model.latent_channels * int(
            np.ceil(image.shape[1] / model.spatial_factor)
            * np.ceil(image.shape[2] / model.spatial_factor)
        )
        score = tuple(map(float, _scores(jnp.asarray(image), jnp.asarray(recon), latent_values)))
        write_image(destination, np.concatenate([image, recon], axis=2) if args.compare else recon)
        scores.append(score)
        line = (
            f"{source} -> {destination}: PSNR {score[0]:.2f} dB, SSIM {score[1]:.4f} "
            f"(bicubic with as many values: PSNR {score[2]:.2f} dB)"
        )
        return line, {"psnr": score[0]}

    failures = run_jobs(jobs, "reconstructing", reconstruct)
    if len(scores) > 1:
        mean = np.mean(scores, axis=0)
        programs = (
            "" if runner.codec is None else f"; {len(runner.codec.programs)} programs compiled"
        )
        print(
            f"{len(scores)} images: mean PSNR {mean[0]:.2f} dB, SSIM {mean[1]:.4f} "
            f"(bicubic {mean[2]:.2f} dB){programs}"
        )
    return exit_status(args.command, failures, len(jobs), "images")


@functools.partial(jax.jit, static_argnums=2)
def _scores(x: Any, y: Any, latent_values: int) -> tuple[Any, Any, Any]:
    """PSNR and SSIM of a reconstruction `y` of `x`, and the PSNR of bicubic resampling
    through `latent_values` numbers: one program per image size (the operations one by
    one would compile a few dozen)."""
    bicubic = jnp.clip(bicubic_baseline(x, latent_values), -1.0, 1.0)
    return psnr(x, y), ssim(x, y), psnr(x, bicubic)
