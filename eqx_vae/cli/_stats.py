"""`eqx-vae stats --data DIR`: the statistics of a model's latents over a folder of
images, the latent scaling they give, and the model with it."""

import argparse
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from .._images import IMAGE_SUFFIXES, read_image, resize
from .._progress import Progress
from .._statistics import (
    CONVENTIONS,
    LatentStatistics,
    apply_latent_statistics,
    family_convention,
    latent_statistics,
)
from ._common import add_model_arguments, compute_dtype, load_model, model_name
from ._convert import destination_kind, save_any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "stats",
        help="measure a model's latent statistics over a folder of images",
        description=(
            "Encode every image under DIR (its shorter side resized to --size, centre "
            "cropped to a square) and print the per-channel and overall mean and standard "
            "deviation of the latents, and the latent scaling they give under the model "
            "family's convention. With --out, write the model with that scaling."
        ),
    )
    parser.add_argument("--data", type=pathlib.Path, required=True, metavar="DIR")
    add_model_arguments(parser)
    parser.add_argument("--size", type=int, default=256, help="square crop size (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument(
        "--sample",
        type=int,
        metavar="SEED",
        help="use samples of the posterior drawn from SEED (by default its mode)",
    )
    parser.add_argument(
        "--convention",
        choices=CONVENTIONS,
        help="the latent convention to derive (by default the model's own)",
    )
    parser.add_argument(
        "--target-std", type=float, default=1.0, help="std of the scaled latents (default 1)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help="write the model with the derived scaling here (.eqx, .safetensors or a folder)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.size < 1 or args.batch < 1:
        raise ValueError(f"--size and --batch must be positive, got {args.size} and {args.batch}.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}.")
    if not args.data.is_dir():
        raise FileNotFoundError(f"The data folder {args.data} does not exist.")
    files = sorted(
        p for p in args.data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )[: args.limit]
    if not files:
        raise ValueError(f"{args.data} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    out_kind = destination_kind(args.out) if args.out is not None else None
    model = load_model(args)
    f = model.spatial_factor
    if args.size % f:
        raise ValueError(f"--size must be a multiple of the model's spatial factor {f}.")
    flux2 = model.config.patch_size is not None
    if args.convention is not None and (args.convention == "batch_norm") != flux2:
        raise ValueError(
            f"--convention {args.convention}: "
            + (
                "FLUX.2 models normalise their latents by BatchNorm statistics (batch_norm)."
                if flux2
                else "batch_norm is FLUX.2's convention; this model has no latent BatchNorm."
            )
        )
    key = None if args.sample is None else jax.random.key(args.sample)
    bar = Progress(len(files), "encoding")
    stats = latent_statistics(
        model, _batches(files, args.size, args.batch, bar), key=key, dtype=compute_dtype(args)
    )
    convention = args.convention or family_convention(model)
    fields = stats.config_fields(convention, target_std=args.target_std)
    print(f"model: {model_name(args)}; {stats.images} images at {args.size} px")
    print(_report(stats))
    print(f"convention: {convention} (scaled latents with std {args.target_std:g})")
    for name, value in fields.items():
        print(f"  {name}: {_number(value)}")
    if args.out is not None and out_kind is not None:
        updated = apply_latent_statistics(model, stats, convention, target_std=args.target_std)
        save_any(args.out, updated, out_kind)
        print(f"wrote {args.out} ({out_kind})")
    return 0


def _batches(
    files: list[pathlib.Path], size: int, batch: int, bar: Progress
) -> Iterator[np.ndarray]:
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        yield np.stack([_square(read_image(p), size) for p in chunk])
        bar.update(len(chunk))


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """The image's centre square, resized to `size`."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize(image[:, top : top + side, left : left + side], size)


def _report(stats: LatentStatistics) -> str:
    lines = ["channel      mean       std"]
    for c, (m, s) in enumerate(zip(stats.mean, stats.std, strict=True)):
        lines.append(f"{c:>7} {m:>9.4f} {s:>9.4f}")
    lines.append(f"{'all':>7} {stats.global_mean:>9.4f} {stats.global_std:>9.4f}")
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
