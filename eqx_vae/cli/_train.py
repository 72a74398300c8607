"""`eqx-vae train --data DIR`: train or fine-tune an autoencoder on a folder of images."""

import argparse
import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from .._autoencoder import AutoencoderKL
from .._builtin import builtin_config
from .._config import PRESETS, AutoencoderKLConfig
from .._latents import describe_convention
from .._serialisation import save
from .._state_dict import cast_floating
from .._statistics import LatentStatistics, apply_latent_statistics
from ._checks import ArgumentProblems
from ._common import describe, load_model
from ._convert import BUILTIN


def add_parser(commands: Any) -> None:
    defaults = _train_config_defaults()
    parser = commands.add_parser(
        "train",
        help="train or fine-tune an autoencoder on a folder of images",
        description=(
            "Train with the KL recipe (reconstruction, KL, learned log-variance, optional "
            "LPIPS and PatchGAN discriminator) on random crops of the PNG/JPEG images under "
            "DIR. Writes checkpoint.eqx (resumed when present), metrics.jsonl, losses.png, "
            "sample grids, and at the end model.eqx (the EMA weights when kept) to --out."
        ),
    )
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    _add_recipe_arguments(parser, defaults)
    _add_run_arguments(parser)
    parser.set_defaults(run=run)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=pathlib.Path, required=True, metavar="DIR")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/train"))
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--model",
        help=f"fine-tune this model (any that `--model` loads; {BUILTIN} for the built-in one)",
    )
    start.add_argument(
        "--new",
        choices=["builtin", *PRESETS],
        default="builtin",
        help="train a new, randomly initialised model of this architecture (default builtin)",
    )
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="the family of a single-file --model"
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="take crops at random scales in this range (below 1 shrinks; default 1 1)",
    )
    parser.add_argument(
        "--permute-channels",
        action="store_true",
        help="shuffle each crop's RGB channels (colour augmentation)",
    )
    parser.add_argument(
        "--dead-leaves",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help=(
            "make this fraction of the samples synthetic dead-leaves images coloured "
            "from the folder's images (default 0)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0)


def _add_recipe_arguments(parser: argparse.ArgumentParser, defaults: Any) -> None:
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=(
            f"Adam's learning rate (default {defaults.learning_rate:g} to fine-tune a "
            f"--model, {FROM_SCRATCH['learning_rate']:g} for a new one)"
        ),
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=(
            "linear warm-up steps (default 0 to fine-tune, "
            f"min({FROM_SCRATCH['warmup_steps']}, --steps / 2) for a new model)"
        ),
    )
    parser.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        help=(
            "decay the learning rate to a tenth by --steps (default: on for a new model, "
            "off to fine-tune)"
        ),
    )
    parser.add_argument("--reconstruction", choices=["l1", "l2"], default="l1")
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument(
        "--disc-weight",
        type=float,
        default=0.0,
        help="adversarial factor (the recipe's 0.5; 0, the default, trains no discriminator)",
    )
    parser.add_argument("--disc-start", type=int, default=defaults.disc_start)
    parser.add_argument("--perceptual-weight", type=float, default=0.0)
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=0.0,
        help="weight of the error of the images' means over --colour-block blocks, added "
        "to the per-pixel error (local colour; 0, the default, disables it)",
    )
    parser.add_argument("--colour-block", type=int, default=defaults.colour_block)
    parser.add_argument(
        "--vgg16", type=pathlib.Path, help="torchvision's VGG16 weights, for LPIPS"
    )
    parser.add_argument("--decoder-only", action="store_true")
    parser.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help=(
            "keep EMA weights (default: none to fine-tune, "
            f"{FROM_SCRATCH['ema_decay']} for a new model)"
        ),
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument(
        "--checkpointing", action="store_true", help="recompute activations (less memory)"
    )
    parser.add_argument(
        "--devices", type=int, default=1, help="data-parallel over this many local devices"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], help="compute dtype")
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument(
        "--latent-statistics",
        type=int,
        default=0,
        metavar="BATCHES",
        help=(
            "at the end, measure the latent statistics over this many batches and write "
            "model.eqx with the latent scaling they give (the model's own convention)"
        ),
    )


# The settings a new model trains with unless told otherwise: those that trained the
# built-in model (examples/train_builtin.py). The recipe's own learning rate, 4.5e-6,
# is for fine-tuning a trained model; a new one at that rate barely moves.
FROM_SCRATCH: dict[str, Any] = {
    "learning_rate": 2e-3,
    "warmup_steps": 100,
    "cosine": True,
    "betas": (0.9, 0.99),
    "ema_decay": 0.999,
}


def resolve_recipe(args: argparse.Namespace) -> str:
    """Fills the recipe options left unset with the settings for a new model (no
    `--model`) or for fine-tuning, and says which."""
    new = args.model is None
    tuning = _train_config_defaults()
    if args.learning_rate is None:
        args.learning_rate = FROM_SCRATCH["learning_rate"] if new else tuning.learning_rate
    if args.warmup_steps is None:
        args.warmup_steps = min(FROM_SCRATCH["warmup_steps"], args.steps // 2) if new else 0
    if args.cosine is None:
        args.cosine = FROM_SCRATCH["cosine"] if new else False
    if args.ema is None and new:
        args.ema = FROM_SCRATCH["ema_decay"]
    args.betas = FROM_SCRATCH["betas"] if new else tuning.betas
    start = (
        f"a new {args.new} model, with the from-scratch settings"
        if new
        else f"fine-tuning {args.model}, with the recipe's settings"
    )
    return (
        f"{start} unless given: learning rate {args.learning_rate:g}, "
        f"{args.warmup_steps} warm-up steps, {'cosine' if args.cosine else 'no'} decay, "
        f"Adam betas {args.betas}, EMA {args.ema}"
    )


def _train_config_defaults() -> Any:
    from ..train._state import TrainConfig  # needs no optax

    return TrainConfig()


def check_arguments(args: argparse.Namespace) -> None:
    """Raises `ValueError` naming every option whose value training would refuse or
    crash on, before any data or model is loaded."""
    problems = ArgumentProblems()
    problems.check(
        0 <= args.dead_leaves <= 1, "--dead-leaves", args.dead_leaves, "must lie in [0, 1]"
    )
    for options, minimum in [
        (("--steps", "--batch-size", "--crop-size", "--accumulate"), 1),
        (("--sample-every", "--checkpoint-every"), 1),
        (("--warmup-steps", "--disc-start", "--latent-statistics"), 0),
        (("--learning-rate", "--kl-weight", "--disc-weight", "--perceptual-weight"), 0.0),
    ]:
        for option in options:
            problems.at_least(option, getattr(args, _dest(option)), minimum)
    low, high = args.scale
    problems.check(0 < low <= high, "--scale", args.scale, "must be a range 0 < LOW <= HIGH")
    if args.ema is not None:
        problems.check(0 < args.ema < 1, "--ema", args.ema, "must lie between 0 and 1")
    if args.cosine and args.steps >= 1:
        problems.check(
            args.steps > args.warmup_steps,
            "--steps",
            args.steps,
            f"must be more than --warmup-steps {args.warmup_steps} to decay (--cosine)",
        )
    count = jax.local_device_count()
    problems.check(
        1 <= args.devices <= count, "--devices", args.devices, f"must be between 1 and {count}"
    )
    if args.devices >= 1 and args.accumulate >= 1:
        problems.check(
            args.batch_size % (args.devices * args.accumulate) == 0,
            "--batch-size",
            args.batch_size,
            f"must be a multiple of --devices {args.devices} x --accumulate {args.accumulate}",
        )
    if args.model is None and args.crop_size >= 1:
        factor = _new_config(args.new).spatial_factor
        problems.check(
            args.crop_size % factor == 0,
            "--crop-size",
            args.crop_size,
            f"must be a multiple of the spatial factor {factor} of --new {args.new}",
        )
    if args.perceptual_weight > 0:
        problems.check(
            args.vgg16 is not None,
            "--perceptual-weight",
            args.perceptual_weight,
            "needs --vgg16 (torchvision's VGG16 weights)",
        )
    if args.vgg16 is not None:
        problems.check(args.vgg16.is_file(), "--vgg16", args.vgg16, "does not exist")
    problems.seed("--seed", args.seed)
    problems.raise_if_any()


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def _new_config(name: str) -> AutoencoderKLConfig:
    return builtin_config() if name == "builtin" else getattr(AutoencoderKLConfig, name)()


def run(args: argparse.Namespace) -> int:
    from jax.sharding import Mesh

    from .. import train

    recipe = resolve_recipe(args)
    check_arguments(args)
    config = _train_config(args)
    lpips = None
    if args.perceptual_weight > 0:  # with --vgg16, as checked
        lpips = train.LPIPS.from_files(args.vgg16)
    folder = train.ImageFolder(
        args.data,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        seed=args.seed,
        scale=tuple(args.scale),
        permute_channels=args.permute_channels,
    )
    data: Any = folder
    if args.dead_leaves > 0:
        leaves = train.DeadLeaves(
            crop_size=args.crop_size,
            batch_size=args.batch_size,
            seed=args.seed + 1,
            colours=_palette(folder),
        )
        data = train.Mixture(
            [folder, leaves],
            [1 - args.dead_leaves, args.dead_leaves],
            batch_size=args.batch_size,
            seed=args.seed + 2,
        )
    key = jax.random.key(args.seed)
    vae = _starting_model(args, jax.random.fold_in(key, 0))
    print(f"training {describe(vae)} on {len(folder.files)} images from {args.data}")
    if args.dead_leaves > 0:
        print(f"{args.dead_leaves:.0%} of the samples are dead-leaves images")
    print(recipe)
    print("config:", {k: v for k, v in dataclasses.asdict(config).items()})
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.fold_in(key, 1))
    mesh = None
    if args.devices > 1:
        mesh = Mesh(np.asarray(jax.local_devices()[: args.devices]), ("batch",))
    samples, _ = folder.batch(train.DataPosition(epoch=1_000_000))
    state = train.fit(
        state,
        config,
        data,
        optimizers,
        steps=args.steps,
        out=args.out,
        key=jax.random.fold_in(key, 2),
        lpips=lpips,
        samples=samples[:4],
        sample_every=args.sample_every,
        checkpoint_every=args.checkpoint_every,
        mesh=mesh,
        statistics_batches=args.latent_statistics,
    )
    from ..train._loop import STATISTICS

    model = state.ema if state.ema is not None else state.vae
    if args.latent_statistics:
        record = json.loads((args.out / STATISTICS).read_text())
        model = apply_latent_statistics(model, LatentStatistics.from_dict(record))
        scaling = describe_convention(model.config)
        print(f"latent scaling from {record['images']} images: {scaling}")
    save(args.out / "model.eqx", model)
    print(f"wrote {args.out / 'model.eqx'} after step {int(state.step)}")
    return 0


def _train_config(args: argparse.Namespace) -> Any:
    from .. import train

    return train.TrainConfig(
        reconstruction=args.reconstruction,
        perceptual_weight=args.perceptual_weight,
        colour_weight=args.colour_weight,
        colour_block=args.colour_block,
        kl_weight=args.kl_weight,
        disc_weight=args.disc_weight,
        disc_start=args.disc_start,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        decay_steps=args.steps if args.cosine else None,
        decoder_only=args.decoder_only,
        ema_decay=args.ema,
        betas=args.betas,
        accumulate=args.accumulate,
        checkpoint=args.checkpointing,
        compute_dtype=args.dtype,
    )


def _starting_model(args: argparse.Namespace, key: Any) -> AutoencoderKL:
    """The model `--model` names (in float32), or a new one of `--new`'s architecture."""
    if args.model is None:
        return AutoencoderKL(_new_config(args.new), key=key)
    vae = load_model(argparse.Namespace(model=args.model, preset=args.preset))
    vae = cast_floating(vae, np.float32)
    factor = vae.spatial_factor
    if args.crop_size % factor:
        raise ValueError(
            f"--crop-size {args.crop_size}: must be a multiple of the spatial factor {factor} "
            f"of --model {args.model}."
        )
    return vae


def _palette(folder: Any, batches: int = 8) -> np.ndarray:
    """Colours for dead-leaves images: the pixels of a few batches of the folder's
    crops (from an epoch training does not reach)."""
    from .. import train

    position, pixels = train.DataPosition(epoch=2_000_000), []
    for _ in range(batches):
        batch, position = folder.batch(position)
        pixels.append(np.moveaxis(batch, 1, -1).reshape(-1, 3))
    return np.concatenate(pixels)
