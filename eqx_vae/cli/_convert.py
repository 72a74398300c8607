"""`eqx-vae convert SRC DST`: between diffusers folders, original single files and eqx_vae
checkpoints."""

import argparse
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from .._autoencoder import AutoencoderKL
from .._config import PRESETS
from .._serialisation import MAGIC, load, save
from ..interop import load_diffusers, load_single_file, save_diffusers, save_single_file


DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
KINDS = ("diffusers", "single-file", "eqx")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert between diffusers folders, single files and eqx_vae checkpoints",
        description=(
            "Convert a VAE between a diffusers folder, an original single file "
            "(.safetensors, or a PyTorch pickle when torch is installed) and an eqx_vae "
            "checkpoint (.eqx). The kinds are told from the paths: a folder is a diffusers "
            "model, a file starting with the eqx_vae header an eqx_vae checkpoint, any other "
            "file a single file; DST ending in .eqx is written as an eqx_vae checkpoint, in "
            ".safetensors as a single file, anything else as a diffusers folder."
        ),
    )
    parser.add_argument("src", type=pathlib.Path, metavar="SRC")
    parser.add_argument("dst", type=pathlib.Path, metavar="DST")
    parser.add_argument("--to", choices=KINDS, help="the kind of DST, instead of its suffix")
    parser.add_argument("--dtype", choices=list(DTYPES), help="parameter dtype to store")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="the model family of a single-file SRC (its latent scaling is not in the file)",
    )
    parser.add_argument("--variant", help="read and write diffusion_pytorch_model.VARIANT.*")
    parser.set_defaults(run=run)


def source_kind(path: pathlib.Path) -> str:
    if path.is_dir():
        return "diffusers"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as f:
        return "eqx" if f.read(len(MAGIC)) == MAGIC else "single-file"


def destination_kind(path: pathlib.Path) -> str:
    if path.suffix == ".eqx":
        return "eqx"
    if path.suffix == ".safetensors":
        return "single-file"
    if path.suffix and not path.is_dir():
        raise ValueError(
            f"Cannot tell what to write to {path}: use a folder, a .safetensors or an .eqx "
            "path, or --to."
        )
    return "diffusers"


def load_any(
    path: pathlib.Path,
    *,
    dtype: Any = None,
    preset: str | None = None,
    variant: str | None = None,
) -> tuple[AutoencoderKL, str]:
    """Loads a model of any kind, telling the kind from the path."""
    kind = source_kind(path)
    if kind == "diffusers":
        model = load_diffusers(path, dtype=dtype, variant=variant)
    elif kind == "eqx":
        model = load(path)
        if dtype is not None:
            model = jax.tree_util.tree_map(lambda a: a.astype(dtype), model)
    else:
        model = load_single_file(path, preset=preset, dtype=dtype)
    return model, kind


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    model, src_kind = load_any(args.src, dtype=dtype, preset=args.preset, variant=args.variant)
    dst_kind = args.to or destination_kind(args.dst)
    if dst_kind == "diffusers":
        save_diffusers(model, args.dst, variant=args.variant)
    elif dst_kind == "single-file":
        save_single_file(model, args.dst)
    else:
        save(args.dst, model)
    leaves = jax.tree_util.tree_leaves(model)
    count = sum(leaf.size for leaf in leaves)
    print(
        f"converted {args.src} ({src_kind}) -> {args.dst} ({dst_kind}): {count:,} parameters, "
        f"{leaves[0].dtype}, latent_channels={model.config.latent_channels}, "
        f"scaling_factor={model.config.scaling_factor}"
    )
    return 0
