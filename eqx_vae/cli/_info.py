"""`eqx-vae info`: what a model is."""

import argparse
import json
from typing import Any

from .._latents import describe_convention
from ._common import add_model_arguments, describe, load_model, model_name


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "info",
        help="print a model's config, parameter count and latent scaling",
        description="Print a model's config, parameter count, spatial factor and latent scaling.",
    )
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the config as JSON only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    config = model.config.to_dict()
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    c = model.config
    print(f"model: {model_name(args)}")
    print(describe(model))
    print(f"latent scaling: {describe_convention(c)}")
    print(f"force_upcast: {c.force_upcast}")
    print("config:")
    for key, value in config.items():
        print(f"  {key}: {value}")
    return 0
