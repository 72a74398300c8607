"""`eqx-vae export OUT`: the encoder and decoder as `jax.export` programs in one file
that JAX alone can serve."""

import argparse
import pathlib
from typing import Any

from .._export import PLATFORMS, export
from .._serving import _METHODS
from ._checks import ArgumentProblems
from ._common import add_model_arguments, compute_dtype, describe, load_model, model_name


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "export",
        help="write the encoder and decoder as jax.export programs for serving",
        description=(
            "Write the model's encoder and decoder as jax.export programs, one per method "
            "and resolution, each for any batch size, with the parameters stored once, to "
            "one zip file that JAX alone can load and run (eqx_vae.load_exported, or a "
            "copy of eqx_vae/_exported_reader.py)."
        ),
    )
    parser.add_argument("output", type=pathlib.Path, metavar="OUT", help="the file to write")
    add_model_arguments(parser)
    parser.add_argument(
        "--resolutions",
        required=True,
        metavar="SIZES",
        help="image sizes in pixels, comma-separated: 512 for 512x512, 512x768 for "
        "height 512 and width 768",
    )
    parser.add_argument(
        "--methods",
        default="encode,decode",
        help="encode, decode or both, comma-separated (default encode,decode)",
    )
    parser.add_argument(
        "--pixels",
        action="store_true",
        help="exchange images as 8-bit pixels, channels last (B, H, W, C)",
    )
    parser.add_argument(
        "--platforms",
        help=f"platforms to export for, comma-separated, out of {', '.join(PLATFORMS)} "
        "(by default the one this runs on)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    problems = ArgumentProblems()
    resolutions = _resolutions(args.resolutions, problems)
    methods = _names(args.methods, _METHODS, "--methods", problems)
    platforms = None
    if args.platforms is not None:
        platforms = _names(args.platforms, PLATFORMS, "--platforms", problems)
    problems.raise_if_any()
    model = load_model(args)
    print(f"model: {model_name(args)}, {describe(model)}")
    header = export(
        model,
        args.output,
        resolutions=resolutions,
        methods=methods,
        dtype=compute_dtype(args),
        pixels=args.pixels,
        platforms=platforms,
    )
    for program in header["programs"]:
        outputs = ", ".join(_spec(o) for o in program["outputs"])
        h, w = program["size"]
        print(f"  {program['method']} {h}x{w}: {_spec(program['input'])} -> {outputs}")
    size = args.output.stat().st_size
    print(
        f"wrote {args.output} ({size / 2**20:.1f} MiB): {len(header['programs'])} programs "
        f"for {', '.join(header['platforms'])}, compute dtype {header['compute_dtype']}, "
        f"{len(header['parameters'])} parameter arrays"
    )
    return 0


def _resolutions(text: str, problems: ArgumentProblems) -> list[tuple[int, int]]:
    """`512,512x768` as `[(512, 512), (512, 768)]`."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        ok = len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts)
        problems.check(
            ok, "--resolutions", item, "must be N (for N x N) or HxW, positive integers"
        )
        if ok:
            h, w = int(parts[0]), int(parts[-1])
            sizes.append((h, w))
    return sizes


def _names(
    text: str, allowed: tuple[str, ...], option: str, problems: ArgumentProblems
) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    for name in names:
        problems.check(name in allowed, option, name, f"must be one of {', '.join(allowed)}")
    return names


def _spec(spec: dict[str, Any]) -> str:
    return f"({', '.join(map(str, spec['shape']))}) {spec['dtype']}"
