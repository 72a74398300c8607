"""Trains the built-in model: the small autoencoder of `eqx_vae.builtin_config()`
with the KL recipe (L1 reconstruction, KL weight 1e-6, learned log-variance, EMA
weights) on the sample photographs that ship with scikit-image, then continues with
each crop's colour channels permuted (`--tune-steps`), and reports PSNR and SSIM on
two held-out photographs next to bicubic down- and up-sampling that keeps as many
values as the latent.

    pip install -e ".[train]"
    python examples/train_builtin.py --out runs/builtin            # the shipped model
    python examples/train_builtin.py --out runs/smoke --steps 20 --tune-steps 20

`--install` writes the EMA weights (float16) to `eqx_vae/pretrained/photos_f4.eqx`.
A run that is stopped continues from its last checkpoint when started again.
"""

import argparse
import dataclasses
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


def export_photos(folder: pathlib.Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_PHOTOS:
        for i, image in enumerate(photo(name)):
            path = folder / f"{name}_{i}.png"
            if not path.exists():
                Image.fromarray(image).save(path)


def held_out(factor: int) -> dict[str, np.ndarray]:
    """The held-out photographs in `[-1, 1]`, channels first, cropped to a multiple of
    the spatial factor."""
    out = {}
    for name in HELD_OUT:
        image = photo(name)[0].astype(np.float32) / 127.5 - 1.0
        h, w = (s - s % factor for s in image.shape[:2])
        out[name] = np.ascontiguousarray(np.transpose(image[:h, :w], (2, 0, 1)))
    return out


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


def latent_scaling(model: eqx_vae.AutoencoderKL, data: train.ImageFolder) -> float:
    """`1 / std` of the posterior modes over a pass of training crops."""
    encode = eqx.filter_jit(lambda m, x: jax.vmap(lambda i: m.encode(i).mode())(x))
    position, latents = train.DataPosition(epoch=10_000), []
    for _ in range(8):
        batch, position = data.batch(position)
        latents.append(np.asarray(encode(model, jnp.asarray(batch))))
    return float(1.0 / np.std(np.concatenate(latents)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="runs/builtin", help="the run's folder")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--tune-steps", type=int, default=5000, help="second stage")
    parser.add_argument("--tune-learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--install", action="store_true", help=f"write {BUILTIN_PATH}")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    export_photos(out / "data")
    data = train.ImageFolder(
        out / "data", crop_size=args.crop_size, batch_size=args.batch_size, seed=args.seed
    )
    config = train.TrainConfig(
        reconstruction="l1",
        kl_weight=1e-6,
        disc_weight=0.0,
        learning_rate=args.learning_rate,
        warmup_steps=min(100, args.steps // 2),
        decay_steps=args.steps,
        betas=(0.9, 0.99),
        ema_decay=0.999,
    )
    vae = eqx_vae.AutoencoderKL(builtin_config(), key=jax.random.key(args.seed))
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(args.seed + 1))
    factor = vae.spatial_factor
    evaluation = held_out(factor)
    # Sample grids: a centre crop of each held-out photograph.
    samples = np.stack(
        [
            img[:, (img.shape[1] - 128) // 2 :][:, :128, (img.shape[2] - 128) // 2 :][:, :, :128]
            for img in evaluation.values()
        ]
    )
    begun = time.perf_counter()
    state = train.fit(
        state,
        config,
        data,
        optimizers,
        steps=args.steps,
        out=out,
        key=jax.random.key(args.seed + 2),
        samples=samples,
    )
    assert state.ema is not None
    first = evaluate(state.ema, evaluation)

    # Second stage: continue from the first stage's EMA weights and log-variance with
    # each crop's colour channels in a random order, at a lower rate, so that colours
    # absent from seven photographs (the deep blue of a night sky) are seen.
    if args.tune_steps > 0:
        tune_config = dataclasses.replace(
            config,
            learning_rate=args.tune_learning_rate,
            warmup_steps=min(50, args.tune_steps // 2),
            decay_steps=args.tune_steps,
            logvar_init=float(state.logvar),
        )
        tune_data = train.ImageFolder(
            out / "data",
            crop_size=args.crop_size,
            batch_size=args.batch_size,
            seed=args.seed + 1,
            permute_channels=True,
        )
        tune_optimizers = train.make_optimizers(tune_config)
        state = train.init_state(
            state.ema, tune_config, tune_optimizers, key=jax.random.key(args.seed + 1)
        )
        state = train.fit(
            state,
            tune_config,
            tune_data,
            tune_optimizers,
            steps=args.tune_steps,
            out=out / "tune",
            key=jax.random.key(args.seed + 3),
            samples=samples,
        )
    seconds = time.perf_counter() - begun

    assert state.ema is not None
    model = state.ema
    scaled = dataclasses.replace(model.config, scaling_factor=latent_scaling(model, data))
    model = with_config(model, scaled)
    results = evaluate(model, evaluation)
    summary = {
        "steps": args.steps,
        "tune_steps": args.tune_steps,
        "train_seconds_this_run": seconds,
        "parameters": sum(
            x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        ),
        "scaling_factor": scaled.scaling_factor,
        "held_out": results,
        "held_out_after_first_stage": first,
        "mean_psnr": float(np.mean([r["psnr"] for r in results.values()])),
        "mean_bicubic_psnr": float(np.mean([r["bicubic_psnr"] for r in results.values()])),
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), model)
    eqx_vae.save(out / "photos_f4.eqx", half)
    if args.install:
        eqx_vae.save(BUILTIN_PATH, half)
        print(f"wrote {BUILTIN_PATH}")


if __name__ == "__main__":
    main()
