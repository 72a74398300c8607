"""`eqx-vae convert SRC DST`: between diffusers folders, original single files and eqx_vae
checkpoints."""

import argparse
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from .._autoencoder import AutoencoderKL
from .._builtin import load_builtin
from .._config import PRESETS, AutoencoderKLConfig
from .._errors import CheckpointError
from .._latents import describe_convention
from .._serialisation import MAGIC, load, save
from .._state_dict import cast_floating
from ..interop import load_diffusers, load_single_file, save_diffusers, save_single_file
from ..interop._diffusers import read_config
from ..interop._safetensors import looks_like_safetensors
from ..interop._stored_dtype import stored_dtype
from ..interop._torch_files import PICKLE_SUFFIXES, looks_like_torch_file


DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
KINDS = ("diffusers", "single-file", "eqx")
# The name that stands for the built-in model wherever a model path is accepted.
BUILTIN = "builtin"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert between diffusers folders, single files and eqx_vae checkpoints",
        description=(
            "Convert a VAE between a diffusers folder, an original single file "
            "(.safetensors, or a PyTorch pickle when torch is installed) and an eqx_vae "
            "checkpoint (.eqx). The kind of SRC is told from its contents: a folder is a "
            "diffusers model (PyTorch or Flax weights), a file an eqx_vae checkpoint, a "
            "safetensors file or a PyTorch checkpoint by how it starts, whatever its name. "
            "DST ending in .eqx is written as an eqx_vae checkpoint, in .safetensors as a "
            "single file, anything else as a diffusers folder."
        ),
    )
    parser.add_argument(
        "src", metavar="SRC", help=f"the model to convert; {BUILTIN} for the built-in model"
    )
    parser.add_argument("dst", type=pathlib.Path, metavar="DST")
    parser.add_argument("--to", choices=KINDS, help="the kind of DST, instead of its suffix")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="parameter dtype to store (by default the dtype SRC stores)",
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="the model family of a single-file SRC (its latent scaling is not in the file)",
    )
    parser.add_argument(
        "--config",
        type=pathlib.Path,
        metavar="JSON",
        help="the config.json of a single-file SRC of a custom architecture",
    )
    parser.add_argument("--variant", help="read and write diffusion_pytorch_model.VARIANT.*")
    parser.set_defaults(run=run)


def source_kind(path: pathlib.Path) -> str:
    """What a model path holds, told from its contents: a folder is a diffusers model;
    a file an eqx_vae checkpoint, a safetensors file or a PyTorch checkpoint by how it
    starts, whatever its name. A `.safetensors` or PyTorch-named file that starts like
    none of them goes to its reader, which says what is wrong with it; any other raises
    `CheckpointError` saying what the file is not."""
    if path.is_dir():
        return "diffusers"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(MAGIC):
        return "eqx"
    if looks_like_safetensors(head, path.stat().st_size) or looks_like_torch_file(head):
        return "single-file"
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        return "single-file"
    start = "it is empty" if not head else f"it starts with {head[:8]!r}"
    if path.suffix == ".eqx":
        raise CheckpointError(
            f"{path} is not an eqx_vae checkpoint (it does not start with {MAGIC!r}; "
            f"{start}), nor a safetensors file or a PyTorch checkpoint."
        )
    raise CheckpointError(
        f"{path} is not a model file: not an eqx_vae checkpoint (starting with {MAGIC!r}), "
        f"a safetensors file or a PyTorch checkpoint ({start})."
    )


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
    source: str | pathlib.Path,
    *,
    dtype: Any = None,
    preset: str | None = None,
    config: AutoencoderKLConfig | None = None,
    variant: str | None = None,
    keep_dtype: bool = False,
) -> tuple[AutoencoderKL, str]:
    """Loads the built-in model for the name `builtin` (a string; a file or folder of
    that name is `./builtin`), or a model file or folder of any kind, telling the kind
    from its contents (see `source_kind`). Without `dtype`, the parameters are float32,
    or with `keep_dtype` in the dtype the source stores. Returns the model and its
    kind."""
    if isinstance(source, str) and source == BUILTIN:
        return load_builtin(dtype or (jnp.float16 if keep_dtype else None)), "built-in"
    path = pathlib.Path(source)
    kind = source_kind(path)
    if config is not None and kind != "single-file":
        raise ValueError(f"A config is for single files; {path} is a {kind} model.")
    if dtype is None and keep_dtype and kind != "eqx":
        dtype = stored_dtype(path, variant=variant)
    if kind == "diffusers":
        model = load_diffusers(path, dtype=dtype, variant=variant)
    elif kind == "eqx":
        model = load(path)
        if dtype is not None:
            model = cast_floating(model, dtype)
    else:
        model = load_single_file(path, preset=preset, config=config, dtype=dtype)
    return model, kind


def parameter_count(model: AutoencoderKL) -> int:
    """The number of parameters: weights and biases, not FLUX.2's BatchNorm statistics."""
    statistics = sum(x.size for x in jax.tree_util.tree_leaves(model.bn))
    return sum(x.size for x in jax.tree_util.tree_leaves(model)) - statistics


def save_any(
    path: pathlib.Path, model: AutoencoderKL, kind: str, *, variant: str | None = None
) -> None:
    """Writes `model` to `path` as `kind`, one of `KINDS`."""
    if kind == "diffusers":
        save_diffusers(path, model, variant=variant)
    elif kind == "single-file":
        save_single_file(path, model)
    else:
        save(path, model)


def run(args: argparse.Namespace) -> int:
    dst_kind = args.to or destination_kind(args.dst)
    dtype = DTYPES[args.dtype] if args.dtype else None
    config = None if args.config is None else read_config(args.config)
    model, src_kind = load_any(
        args.src,
        dtype=dtype,
        preset=args.preset,
        config=config,
        variant=args.variant,
        keep_dtype=True,
    )
    save_any(args.dst, model, dst_kind, variant=args.variant)
    print(
        f"converted {args.src} ({src_kind}) -> {args.dst} ({dst_kind}): "
        f"{parameter_count(model):,} parameters, {model.dtype}, "
        f"latent_channels={model.config.latent_channels}, "
        f"latent scaling {describe_convention(model.config)}"
    )
    return 0
