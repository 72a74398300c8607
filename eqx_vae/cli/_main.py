import argparse
import os
import sys
from collections.abc import Sequence

from .._errors import CheckpointError
from . import _convert, _export, _info, _latents, _reconstruct, _stats, _train


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `eqx-vae` with `argv` (by default the process arguments); returns the exit
    status."""
    parser = argparse.ArgumentParser(
        prog="eqx-vae", description="The Stable Diffusion family's KL autoencoder in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _reconstruct.add_parser(commands)
    _latents.add_parsers(commands)
    _info.add_parser(commands)
    _train.add_parser(commands)
    _convert.add_parser(commands)
    _stats.add_parser(commands)
    _export.add_parser(commands)
    args = parser.parse_args(argv)
    use_compilation_cache()
    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"eqx-vae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        extra = "train" if args.command == "train" else "cli"
        print(
            f"eqx-vae {args.command}: error: {e} (pip install 'eqx_vae[{extra}]')",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"eqx-vae {args.command}: interrupted", file=sys.stderr)
        return 130


def use_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache, so that a second run finds the
    programs the first one compiled: in `$XDG_CACHE_HOME/eqx_vae/jax` (by default
    `~/.cache/eqx_vae/jax`), unless `JAX_COMPILATION_CACHE_DIR` names another folder
    or `EQX_VAE_NO_COMPILATION_CACHE` is set."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or os.environ.get("EQX_VAE_NO_COMPILATION_CACHE"):
        return
    import jax

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "eqx_vae", "jax"))
