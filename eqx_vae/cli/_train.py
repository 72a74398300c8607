"""`eqx-vae train --data DIR`: train or fine-tune an autoencoder on a folder of images."""

import argparse
import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from .._autoencoder import AutoencoderKL
from .._builtin import builtin_config
from .._config import PRESETS, AutoencoderKLConfig
from .._serialisation import save
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument(
        "--cosine", action="store_true", help="decay the learning rate to a tenth by --steps"
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
        "--vgg16", type=pathlib.Path, help="torchvision's VGG16 weights, for LPIPS"
    )
    parser.add_argument("--decoder-only", action="store_true")
    parser.add_argument("--ema", type=float, metavar="DECAY", help="keep EMA weights")
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
    parser.set_defaults(run=run)


def _train_config_defaults() -> Any:
    from ..train._state import TrainConfig  # needs no optax

    return TrainConfig()


def run(args: argparse.Namespace) -> int:
    from jax.sharding import Mesh

    from .. import train

    config = train.TrainConfig(
        reconstruction=args.reconstruction,
        perceptual_weight=args.perceptual_weight,
        kl_weight=args.kl_weight,
        disc_weight=args.disc_weight,
        disc_start=args.disc_start,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        decay_steps=args.steps if args.cosine else None,
        decoder_only=args.decoder_only,
        ema_decay=args.ema,
        accumulate=args.accumulate,
        checkpoint=args.checkpointing,
        compute_dtype=args.dtype,
    )
    lpips = None
    if args.perceptual_weight > 0:
        if args.vgg16 is None:
            raise ValueError("--perceptual-weight needs --vgg16 (torchvision's VGG16 weights).")
        lpips = train.LPIPS.from_files(args.vgg16)
    if args.devices < 1 or args.devices > jax.local_device_count():
        raise ValueError(
            f"--devices must be between 1 and {jax.local_device_count()}, got {args.devices}."
        )
    if args.batch_size % (args.devices * args.accumulate):
        raise ValueError(
            f"--batch-size {args.batch_size} must divide into --devices x --accumulate."
        )
    data = train.ImageFolder(
        args.data,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        seed=args.seed,
        scale=tuple(args.scale),
        permute_channels=args.permute_channels,
    )
    key = jax.random.key(args.seed)
    if args.model is not None:
        vae = load_model(argparse.Namespace(model=args.model, preset=args.preset))
        vae = jax.tree_util.tree_map(lambda x: x.astype(np.float32), vae)
    else:
        new = (
            builtin_config() if args.new == "builtin" else getattr(AutoencoderKLConfig, args.new)()
        )
        vae = AutoencoderKL(new, key=jax.random.fold_in(key, 0))
    factor = vae.spatial_factor
    if args.crop_size % factor:
        raise ValueError(f"--crop-size must be a multiple of the spatial factor {factor}.")
    print(f"training {describe(vae)} on {len(data.files)} images from {args.data}")
    print("config:", {k: v for k, v in dataclasses.asdict(config).items()})
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.fold_in(key, 1))
    mesh = None
    if args.devices > 1:
        mesh = Mesh(np.asarray(jax.local_devices()[: args.devices]), ("batch",))
    samples, _ = data.batch(train.DataPosition(epoch=1_000_000))
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
    )
    model = state.ema if state.ema is not None else state.vae
    save(args.out / "model.eqx", model)
    print(f"wrote {args.out / 'model.eqx'} after step {int(state.step)}")
    return 0
