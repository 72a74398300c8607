import argparse
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
