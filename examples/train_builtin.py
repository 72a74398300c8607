"""Trains the built-in model: the small autoencoder of `eqx_vae.builtin_config()`
with the KL recipe (KL weight 1e-6, learned log-variance, EMA weights) from random
weights, on a mixture of random crops of the colour photographs that ship with
scikit-image (as they are and with their colour channels permuted) and dead-leaves
images (`eqx_vae.train.DeadLeaves`) coloured from those photographs and from saturated
colours: 5,000 steps of L1, then 1,000 steps of L2 with more dead leaves and saturated
colours, and photograph crops dimmed and shifted in colour (`--tune-steps`,
`--tune-contrast`, `--tune-colour-shift`), then 300 steps of the decoder alone on
crops twice the side, with the error of 8-pixel block means weighed more
(`--final-steps`, `--final-crop-size`, `--final-colour-weight`). It reports PSNR, SSIM
and the mean colour error on two held-out sets, next to bicubic down- and up-sampling
that keeps as many values as the latent: two scikit-image photographs kept out of
training, and the sample photographs of scikit-learn and Matplotlib.

    pip install -e ".[train]"
    python examples/train_builtin.py --out runs/builtin            # the shipped model
    python examples/train_builtin.py --out runs/smoke --steps 20 --tune-steps 20 --final-steps 20
    python examples/train_builtin.py --out runs/sizes --crop-size 64 128 --batch-size 8 2
    python examples/train_builtin.py --out runs/final --start WEIGHTS  # third stage only

`--install` writes the EMA weights (float16) to `eqx_vae/pretrained/photos_f4.eqx`;
`--evaluate WEIGHTS` reports saved weights on the held-out sets, a colour chart and flat
colours, and trains nothing; with `--tiles 64` also each photograph's colour error when
its 64-pixel tiles are reconstructed one by one:

    python examples/train_builtin.py --evaluate eqx_vae/pretrained/photos_f4.eqx

A run that is stopped continues from its last checkpoint when started again.
"""

import argparse
import dataclasses
import itertools
import json
import pathlib
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_vae
from eqx_vae import metrics, train
from eqx_vae._builtin import BUILTIN_PATH, builtin_config, with_config


# The colour photographs (the grayscale ones would teach the model to drop colour). Two
# more are held out for evaluation.
TRAIN_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle",
)  # fmt: skip
HELD_OUT = ("chelsea", "rocket")
# A second held-out set from other packages' sample photographs.
OTHER_PHOTOS = ("china", "flower", "grace_hopper")


def photo(name: str) -> list[np.ndarray]:
    """A scikit-image sample as RGB uint8 arrays (the stereo pair gives two)."""
    import skimage.data  # pyright: ignore[reportMissingImports]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = getattr(skimage.data, name)()
    images = list(loaded[:2]) if name == "stereo_motorcycle" else [loaded]
    out = []
    for image in images:
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(image[..., :3].astype(np.uint8))
    return out


def other_photo(name: str) -> np.ndarray:
    """scikit-learn's (china, flower) or Matplotlib's (grace_hopper) sample photograph
    as an RGB uint8 array."""
    if name == "grace_hopper":
        from matplotlib import cbook  # pyright: ignore[reportMissingImports]
        from PIL import Image

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return np.asarray(Image.open(str(path)).convert("RGB"))
    from sklearn.datasets import load_sample_image  # pyright: ignore[reportMissingImports]

    return np.asarray(load_sample_image(f"{name}.jpg"))[..., :3]


def export_photos(folder: pathlib.Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        for i, image in enumerate(photo(name)):
            path = folder / f"{name}_{i}.png"
            if not path.exists():
                Image.fromarray(image).save(path)


def palette(shares: tuple[float, float, float], count: int = 65536, seed: int = 0) -> np.ndarray:
    """Colours for the dead leaves, in `[-1, 1]`, in the proportions `shares` of:
    pixels of the training photographs (as many from each, each in one of the six
    orders of its channels); colours uniform in the RGB cube; and saturated colours
    (each channel near 0, 255 or halfway), which no training photograph has many of."""
    rng = np.random.default_rng(seed)
    images = [image.reshape(-1, 3) for name in TRAIN_PHOTOS for image in photo(name)]
    n_pixels, n_uniform = (round(count * share) for share in shares[:2])
    pixels = np.concatenate(
        [image[rng.integers(0, len(image), n_pixels // len(images) + 1)] for image in images]
    )[:n_pixels]
    pixels = pixels.astype(np.float32) / 127.5 - 1.0
    orders = np.array(list(itertools.permutations(range(3))))
    pixels = np.take_along_axis(pixels, orders[rng.integers(0, 6, n_pixels)], axis=1)
    uniform = rng.uniform(-1.0, 1.0, (n_uniform, 3))
    levels = rng.choice([-1.0, 0.0, 1.0], (count - n_pixels - n_uniform, 3))
    saturated = np.clip(levels + rng.normal(0.0, 0.1, levels.shape), -1.0, 1.0)
    return np.concatenate([pixels, uniform, saturated]).astype(np.float32)


def prepare(image: np.ndarray, factor: int) -> np.ndarray:
    """An RGB uint8 photograph in `[-1, 1]`, channels first, cropped to a multiple of
    the spatial factor."""
    image = image.astype(np.float32) / 127.5 - 1.0
    h, w = (s - s % factor for s in image.shape[:2])
    return np.ascontiguousarray(np.transpose(image[:h, :w], (2, 0, 1)))


def held_out(factor: int) -> dict[str, dict[str, np.ndarray]]:
    """The two held-out sets."""
    return {
        "scikit-image": {name: prepare(photo(name)[0], factor) for name in HELD_OUT},
        "other packages": {name: prepare(other_photo(name), factor) for name in OTHER_PHOTOS},
    }


def evaluate(model: eqx_vae.AutoencoderKL, images: dict[str, np.ndarray]) -> dict:
    reconstruct = eqx.filter_jit(lambda m, x: m(x))
    results = {}
    for name, image in images.items():
        x = jnp.asarray(image)
        recon = jnp.clip(reconstruct(model, x), -1, 1)
        values = (
            model.latent_channels
            * (x.shape[1] // model.spatial_factor)
            * (x.shape[2] // model.spatial_factor)
        )
        bicubic = jnp.clip(metrics.bicubic_baseline(x, values), -1, 1)
        results[name] = {
            "psnr": float(metrics.psnr(x, recon)),
            "ssim": float(metrics.ssim(x, recon)),
            "bicubic_psnr": float(metrics.psnr(x, bicubic)),
            "bicubic_ssim": float(metrics.ssim(x, bicubic)),
            # The mean of reconstruction minus input per colour channel (R, G, B): a
            # colour cast, on the [-1, 1] scale.
            "colour_error": [float(e) for e in jnp.mean(recon - x, axis=(1, 2))],
        }
    return results


def tiled_colour_error(
    model: eqx_vae.AutoencoderKL, image: np.ndarray, tile: int = 64, chunk: int = 16
) -> list[float]:
    """The colour error (as in `evaluate`) of `image`, cropped to a multiple of `tile`
    pixels, when each `tile`-pixel tile is reconstructed on its own: GroupNorm then
    normalises over one tile (a training crop's size, at 64) rather than over the whole
    photograph, and every pixel lies near a tile's border."""
    c, h, w = image.shape
    h, w = h - h % tile, w - w % tile
    tiles = image[:, :h, :w].reshape(c, h // tile, tile, w // tile, tile)
    tiles = tiles.transpose(1, 3, 0, 2, 4).reshape(-1, c, tile, tile)
    reconstruct = eqx.filter_jit(lambda m, x: jnp.clip(jax.vmap(m)(x), -1, 1) - x)
    count, total = len(tiles), np.zeros(c)
    # Fixed-size chunks (the last one padded with repeats): one compiled program.
    for start in range(0, count, chunk):
        part = tiles[start : start + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
        errors = np.asarray(reconstruct(model, jnp.asarray(padded)))[: len(part)]
        total += errors.mean(axis=(2, 3)).sum(axis=0)
    return [float(e) for e in total / count]


def summarise(results: dict) -> dict:
    """Means over a held-out set."""
    return {
        key: float(np.mean([r[key] for r in results.values()]))
        for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")
    } | {
        "largest_colour_error": float(
            max(abs(e) for r in results.values() for e in r["colour_error"])
        )
    }


def colour_checks(model: eqx_vae.AutoencoderKL) -> dict:
    """Reconstruction minus colour per channel (R, G, B) on the patches of
    `metrics.colour_chart()` and on flat 64-pixel images of the same colours
    (`metrics.flat_colours()`), and the largest of each."""
    reconstruct = eqx.filter_jit(lambda m, x: jnp.clip(jax.vmap(m)(x), -1, 1))
    chart = metrics.colour_chart()
    chart_errors = metrics.colour_chart_errors(reconstruct(model, jnp.asarray(chart[None]))[0])
    flat = metrics.flat_colours(64)
    flat_errors = np.asarray(reconstruct(model, jnp.asarray(flat))).mean(axis=(2, 3))
    flat_errors = flat_errors - flat[:, :, 0, 0]
    checks: dict = {
        "chart": {name: [float(e) for e in error] for name, error in chart_errors.items()},
        "flat": {
            name: [float(e) for e in error]
            for name, error in zip(metrics.COLOUR_CHART, flat_errors, strict=True)
        },
    }
    for kind in ("chart", "flat"):
        largest = max(abs(e) for error in checks[kind].values() for e in error)
        checks[f"{kind}_largest_error"] = float(largest)
    return checks


def load_float32(path: str) -> eqx_vae.AutoencoderKL:
    """Saved weights (the built-in model is stored in float16) in float32."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        eqx_vae.load(path),
    )


def evaluate_weights(path: str, tiles: int | None = None) -> None:
    """`--evaluate`: the held-out sets and colour checks of saved weights, and with
    `tiles` each held-out photograph's colour error in tiles of that size
    (`tiled_colour_error`)."""
    model = load_float32(path)
    photos = held_out(model.spatial_factor)
    results = {group: evaluate(model, images) for group, images in photos.items()}
    if tiles is not None:
        for group, images in photos.items():
            for name, image in images.items():
                error = tiled_colour_error(model, image, tiles)
                results[group][name][f"colour_error_{tiles}_pixel_tiles"] = error
    summary = {
        "weights": path,
        "held_out": results,
        "means": {group: summarise(r) for group, r in results.items()},
        "colours": colour_checks(model),
    }
    print(json.dumps(summary, indent=2))


def latent_scaling(model: eqx_vae.AutoencoderKL, data: train.Samples) -> float:
    """`1 / std` of the posterior modes over crops of the training mixture."""
    encode = eqx.filter_jit(lambda m, x: jax.vmap(lambda i: m.encode(i).mode())(x))
    position, latents = train.DataPosition(epoch=10_000), []
    for _ in range(8):
        batch, position = data.batch(position)
        latents.append(np.asarray(encode(model, jnp.asarray(batch))))
    # Flattened: batches of several crop sizes give latents of several sizes.
    return float(1.0 / np.std(np.concatenate([z.ravel() for z in latents])))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with every stage's crop and batch sizes resolved to lists of
    the same length."""
    builtin = builtin_config()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="runs/builtin", help="the run's folder")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument(
        "--crop-size",
        type=int,
        nargs="+",
        default=[64],
        metavar="SIZE",
        help="crop size of the first stage (default 64); several sizes alternate, a batch "
        "of each in turn (`train.Alternating`)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        metavar="BATCH",
        help="batch size of the first stage, one per --crop-size (default 8)",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--mix",
        type=float,
        nargs=3,
        default=(0.5, 0.2, 0.3),
        metavar=("PHOTOS", "PERMUTED", "LEAVES"),
        help="the weights of photograph crops, photograph crops with permuted colour "
        "channels and dead-leaves images in the training data (default 0.5 0.2 0.3)",
    )
    parser.add_argument("--tune-steps", type=int, default=1000, help="second stage")
    parser.add_argument("--tune-learning-rate", type=float, default=5e-4)
    parser.add_argument(
        "--tune-crop-size",
        type=int,
        nargs="+",
        default=None,
        metavar="SIZE",
        help="crop size of the second stage (default: --crop-size); several sizes "
        "alternate, as in the first stage",
    )
    parser.add_argument(
        "--tune-scale",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        metavar=("LOW", "HIGH"),
        help="the scales of the second stage's photograph crops (`ImageFolder(scale=...)`: "
        "a crop at scale s shows crop-size / s pixels of the photograph; default 0.5 1, "
        "as in the first stage)",
    )
    parser.add_argument(
        "--tune-batch-size",
        type=int,
        nargs="+",
        default=None,
        metavar="BATCH",
        help="batch size of the second stage, one per --tune-crop-size (default: "
        "--batch-size when the second stage keeps the first's crop sizes, else 8)",
    )
    parser.add_argument(
        "--tune-mix",
        type=float,
        nargs=3,
        default=(0.25, 0.25, 0.5),
        metavar=("PHOTOS", "PERMUTED", "LEAVES"),
        help="--mix of the second stage (default 0.25 0.25 0.5)",
    )
    parser.add_argument(
        "--contrast",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="blend each dead-leaves image of both stages towards one colour by a factor "
        "in this range (`DeadLeaves(contrast=...)`; by default every image keeps its "
        "full contrast)",
    )
    parser.add_argument(
        "--tune-contrast",
        type=float,
        nargs=2,
        default=(0.3, 1.0),
        metavar=("LOW", "HIGH"),
        help="blend each photograph crop of the second stage towards its mean colour by "
        "a factor in this range (`ImageFolder(contrast=...)`; default 0.3 1)",
    )
    parser.add_argument(
        "--tune-colour-shift",
        type=float,
        default=0.2,
        metavar="SHIFT",
        help="offset each channel of each photograph crop of the second stage by up to "
        "this much (`ImageFolder(colour_shift=...)`; default 0.2)",
    )
    parser.add_argument(
        "--final-steps",
        type=int,
        default=300,
        help="third stage: the decoder alone on larger crops (0 to skip)",
    )
    parser.add_argument("--final-learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--final-colour-weight",
        type=float,
        default=30.0,
        help="third stage: weight of the error of 8-pixel block means, added to the "
        "per-pixel error (`TrainConfig(colour_weight=...)`; default 30, 0 disables it)",
    )
    parser.add_argument(
        "--final-crop-size",
        type=int,
        nargs="+",
        default=[128],
        metavar="SIZE",
        help="crop size of the third stage (default 128); several sizes alternate",
    )
    parser.add_argument(
        "--final-batch-size",
        type=int,
        nargs="+",
        default=None,
        metavar="BATCH",
        help="batch size of the third stage, one per --final-crop-size (default 4)",
    )
    parser.add_argument(
        "--final-encoder",
        action="store_true",
        help="third stage: train the encoder too (by default the decoder alone, and the "
        "latent space stays as the second stage left it)",
    )
    parser.add_argument(
        "--norm-groups",
        type=int,
        default=builtin.norm_num_groups,
        metavar="N",
        help="GroupNorm groups of the model trained from random weights (default: "
        "builtin_config()'s, 8; 4 was tried, README gives its figures)",
    )
    parser.add_argument(
        "--start",
        metavar="WEIGHTS",
        help="skip the first two stages: run the third from these saved weights (an "
        "eqx_vae checkpoint, such as a run's photos_f4.eqx)",
    )
    parser.add_argument(
        "--per-pixel-loss",
        action="store_true",
        help="with several crop sizes, weigh every pixel alike: each batch's loss times "
        "the first crop size's area over its crops' (`TrainConfig(loss_area=...)`); by "
        "default a batch's loss grows with its crops' area",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help=f"write {BUILTIN_PATH}")
    parser.add_argument(
        "--evaluate",
        metavar="WEIGHTS",
        help="evaluate saved weights (an eqx_vae checkpoint, such as "
        f"{BUILTIN_PATH.name}) on the held-out sets and colour checks, and train nothing",
    )
    parser.add_argument(
        "--tiles",
        type=int,
        metavar="SIZE",
        help="with --evaluate, also each held-out photograph's colour error when its "
        "tiles of this size are reconstructed one by one",
    )
    args = parser.parse_args(argv)
    if args.tiles is not None and (args.evaluate is None or args.tiles < 1):
        parser.error("--tiles needs --evaluate and a positive tile size")
    args.batch_size = args.batch_size or [8] * len(args.crop_size)
    if len(args.batch_size) != len(args.crop_size):
        parser.error("--batch-size needs one batch size per --crop-size")
    if args.tune_crop_size is None:
        args.tune_crop_size = args.crop_size
        args.tune_batch_size = args.tune_batch_size or args.batch_size
    args.tune_batch_size = args.tune_batch_size or [8] * len(args.tune_crop_size)
    if len(args.tune_batch_size) != len(args.tune_crop_size):
        parser.error("--tune-batch-size needs one batch size per --tune-crop-size")
    args.final_batch_size = args.final_batch_size or [4] * len(args.final_crop_size)
    if len(args.final_batch_size) != len(args.final_crop_size):
        parser.error("--final-batch-size needs one batch size per --final-crop-size")
    if args.start is not None and args.final_steps < 1:
        parser.error("--start runs the third stage alone and needs --final-steps above 0")
    if args.start is not None and args.norm_groups != builtin.norm_num_groups:
        parser.error(
            "--norm-groups sets the architecture of a model trained from random "
            "weights; --start takes the weights' own"
        )
    try:
        args.architecture = dataclasses.replace(builtin, norm_num_groups=args.norm_groups)
    except ValueError as e:
        parser.error(f"--norm-groups: {e}")
    return args


def stage_data(args: argparse.Namespace, folder: pathlib.Path, stage: int) -> train.Samples:
    """The training data of the first, second or third stage (`parse_args`' options),
    from the photographs `export_photos` wrote to `folder`: for each crop size a mixture
    of photograph crops (at scales 0.5 to 1, which show more of each photograph than
    plain crops; in the second and third stages dimmed by `--tune-contrast` and shifted
    by `--tune-colour-shift`), the same with permuted channels, and dead leaves; several
    sizes alternate, a batch of each in turn (`train.Alternating`). The third stage is
    the second's data (the same streams and seeds) at `--final-crop-size`."""
    contrast = None if args.contrast is None else tuple(args.contrast)
    if stage == 1:
        sizes = zip(args.crop_size, args.batch_size, strict=True)
        mix, shares, scale, augment = args.mix, (0.5, 0.25, 0.25), (0.5, 1.0), {}
    else:
        crops, batches = (
            (args.tune_crop_size, args.tune_batch_size)
            if stage == 2
            else (args.final_crop_size, args.final_batch_size)
        )
        sizes = zip(crops, batches, strict=True)
        stage = 2  # the third stage draws the second's streams, with its seeds
        mix, shares, scale = args.tune_mix, (0.25, 0.25, 0.5), tuple(args.tune_scale)
        augment = {"contrast": tuple(args.tune_contrast), "colour_shift": args.tune_colour_shift}
    colours = palette(shares, seed=args.seed + stage - 1)
    streams = []
    for i, (size, batch) in enumerate(sizes):
        seed = args.seed + 10 * i  # the first size keeps the seeds of one size
        photos = [
            train.ImageFolder(
                folder,
                crop_size=size,
                batch_size=batch,
                seed=seed + j,
                scale=scale,
                permute_channels=j == 1,
                **augment,
            )
            for j in range(2)
        ]
        leaves = train.DeadLeaves(
            crop_size=size,
            batch_size=batch,
            seed=seed + 2 * stage,
            colours=colours,
            contrast=contrast,
        )
        streams.append(
            train.Mixture([*photos, leaves], mix, batch_size=batch, seed=seed + 1 + 2 * stage)
        )
    return streams[0] if len(streams) == 1 else train.Alternating(streams)


def third_stage_config(config: train.TrainConfig, args: argparse.Namespace) -> train.TrainConfig:
    """The third stage's `TrainConfig`, from the first stage's `config`: L2 at
    `--final-learning-rate`, the decoder alone (unless `--final-encoder`), a faster EMA,
    and the error of 8-pixel block means weighed `--final-colour-weight` times more."""
    return dataclasses.replace(
        config,
        reconstruction="l2",
        learning_rate=args.final_learning_rate,
        warmup_steps=min(20, args.final_steps // 2),
        decay_steps=args.final_steps,
        decoder_only=not args.final_encoder,
        ema_decay=0.99,
        loss_area=None,
        colour_weight=args.final_colour_weight,
        colour_block=8,
    )


def run_stage(
    model: eqx_vae.AutoencoderKL,
    config: train.TrainConfig,
    data: train.Samples,
    *,
    steps: int,
    out: pathlib.Path,
    seed: int,
    fit_seed: int,
    samples: np.ndarray,
) -> train.TrainState:
    """One stage: fresh optimisers and state for `model` (`seed`), then `fit` (`fit_seed`),
    with its checkpoints and sample grids in `out`."""
    optimizers = train.make_optimizers(config)
    state = train.init_state(model, config, optimizers, key=jax.random.key(seed))
    return train.fit(
        state,
        config,
        data,
        optimizers,
        steps=steps,
        out=out,
        key=jax.random.key(fit_seed),
        samples=samples,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.evaluate:
        evaluate_weights(args.evaluate, args.tiles)
        return

    out = pathlib.Path(args.out)
    export_photos(out / "data")
    data = stage_data(args, out / "data", stage=1)
    config = train.TrainConfig(
        reconstruction="l1",
        kl_weight=1e-6,
        disc_weight=0.0,
        learning_rate=args.learning_rate,
        warmup_steps=min(100, args.steps // 2),
        decay_steps=args.steps,
        betas=(0.9, 0.99),
        ema_decay=0.999,
        loss_area=args.crop_size[0] ** 2 if args.per_pixel_loss else None,
    )
    evaluation = held_out(builtin_config().spatial_factor)
    # Sample grids: a 128-pixel centre crop of each held-out photograph.
    samples = np.stack(
        [
            img[:, (img.shape[1] - 128) // 2 :][:, :128, (img.shape[2] - 128) // 2 :][:, :, :128]
            for group in evaluation.values()
            for img in group.values()
        ]
    )
    begun = time.perf_counter()
    first = None
    if args.start is None:
        vae = eqx_vae.AutoencoderKL(args.architecture, key=jax.random.key(args.seed))
        state = run_stage(
            vae,
            config,
            data,
            steps=args.steps,
            out=out,
            seed=args.seed + 1,
            fit_seed=args.seed + 2,
            samples=samples,
        )
        assert state.ema is not None
        first = {group: evaluate(state.ema, images) for group, images in evaluation.items()}

        # Second stage: from the first stage's EMA weights and log-variance, L2 rather
        # than L1 (as sd-vae-ft-mse was fine-tuned) on a mix with more dead leaves and
        # more saturated colours. L1 weighs every error alike, so a rare colour that
        # comes back wrong (a saturated green as black) costs no more than a slightly
        # soft edge; L2 weighs the large errors of rare colours more. The photograph
        # crops are dimmed and shifted in colour: without that, dim and low-contrast
        # photographs came back with a colour cast (Grace Hopper's green 0.076 low).
        if args.tune_steps > 0:
            tune_config = dataclasses.replace(
                config,
                reconstruction="l2",
                learning_rate=args.tune_learning_rate,
                warmup_steps=min(50, args.tune_steps // 2),
                decay_steps=args.tune_steps,
                logvar_init=float(state.logvar),
                loss_area=args.tune_crop_size[0] ** 2 if args.per_pixel_loss else None,
            )
            state = run_stage(
                state.ema,
                tune_config,
                stage_data(args, out / "data", stage=2),
                steps=args.tune_steps,
                out=out / "tune",
                seed=args.seed + 1,
                fit_seed=args.seed + 3,
                samples=samples,
            )
        assert state.ema is not None
        model = state.ema
    else:
        model = load_float32(args.start)

    # Third stage: the decoder alone (the encoder, and with it the latent space, stays
    # as it is) on the second stage's data in larger crops, L2 at a low rate. The
    # 64-pixel crops of the first two stages teach a model whose colour depends on the
    # size of what it reconstructs (GroupNorm's statistics, and the convolutions' zero
    # padding near every pixel of a small crop): whole photographs came back with a
    # cast that 64-pixel tiles of them did not (Grace Hopper's green 0.052 low; 0.032
    # after this stage), with the error of 8-pixel block means weighed
    # `--final-colour-weight` times more (30).
    if args.final_steps > 0:
        state = run_stage(
            model,
            third_stage_config(config, args),
            stage_data(args, out / "data", stage=3),
            steps=args.final_steps,
            out=out / "final",
            seed=args.seed + 1,
            fit_seed=args.seed + 5,
            samples=samples,
        )
        assert state.ema is not None
        model = state.ema
    seconds = time.perf_counter() - begun

    scaled = dataclasses.replace(model.config, scaling_factor=latent_scaling(model, data))
    model = with_config(model, scaled)
    results = {group: evaluate(model, images) for group, images in evaluation.items()}
    summary = {
        "steps": args.steps,
        "mix": list(args.mix),
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "per_pixel_loss": args.per_pixel_loss,
        "tune_steps": args.tune_steps,
        "tune_mix": list(args.tune_mix),
        "tune_crop_size": args.tune_crop_size,
        "tune_batch_size": args.tune_batch_size,
        "tune_scale": list(args.tune_scale),
        "contrast": args.contrast,
        "tune_contrast": list(args.tune_contrast),
        "tune_colour_shift": args.tune_colour_shift,
        "start": args.start,
        "norm_num_groups": model.config.norm_num_groups,
        "final_steps": args.final_steps,
        "final_learning_rate": args.final_learning_rate,
        "final_colour_weight": args.final_colour_weight,
        "final_crop_size": args.final_crop_size,
        "final_batch_size": args.final_batch_size,
        "final_encoder": args.final_encoder,
        "train_seconds_this_run": seconds,
        "parameters": sum(
            x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        ),
        "scaling_factor": scaled.scaling_factor,
        "held_out": results,
        "means": {group: summarise(r) for group, r in results.items()},
        "colours": colour_checks(model),
    }
    if first is not None:
        summary["held_out_after_first_stage"] = first
        summary["means_after_first_stage"] = {group: summarise(r) for group, r in first.items()}
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), model)
    eqx_vae.save(out / "photos_f4.eqx", half)
    if args.install:
        eqx_vae.save(BUILTIN_PATH, half)
        print(f"wrote {BUILTIN_PATH}")


if __name__ == "__main__":
    main()
