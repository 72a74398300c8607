"""Trains a small latent diffusion model on the built-in autoencoder's latents of
scikit-image's sample photographs, samples new latents and decodes them to images.

    pip install -e ".[train]"
    python examples/latent_diffusion.py          # 600 steps: about 3 minutes on 2 CPU cores
    python examples/latent_diffusion.py --steps 20 --out runs/ldm_smoke

The denoiser is a two-level U-Net written with `eqx.Module` from eqx_vae's public blocks
(`ResnetBlock2D`, `AttentionBlock`, `Downsample2D`, `Upsample2D`, `MidBlock2D`), with the
timestep brought in between the blocks by FiLM (a per-channel scale and shift computed
from the timestep's embedding). It predicts `v` under the cosine schedule
(`z_t = cos(pi t / 2) z_0 + sin(pi t / 2) noise`, continuous `t` in `[0, 1]`) and is
trained with AdamW. The crops are encoded once, up front; each training step draws a
fresh sample of every latent's posterior and scales it with the autoencoder's
`scale_latents`, under statistics measured on the same crops. Samples come from the
deterministic DDIM sampler, averaged weights (EMA) and a fixed key.

It writes to `--out`: `samples.png` (a 4 x 4 grid of decoded samples), `reference.png`
(16 training crops after encoding and decoding: what perfect samples would look like),
`losses.png`, `metrics.jsonl` and `summary.json`. The same seed gives the same files.
"""

import argparse
import json
import math
import pathlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_vae


# The colour photographs that the built-in autoencoder was trained on.
PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle",
)  # fmt: skip
GRID = 4  # samples per side of the grid


def photographs() -> list[np.ndarray]:
    """The photographs as RGB uint8 arrays `(height, width, 3)` (the stereo pair gives
    two)."""
    import skimage.data  # pyright: ignore[reportMissingImports]

    out = []
    for name in PHOTOS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-image's download notices
            loaded = getattr(skimage.data, name)()
        # The stereo pair comes with its disparity map: the two views are the photos.
        out.extend(loaded[:2] if name == "stereo_motorcycle" else [loaded])
    return [np.asarray(image)[..., :3].astype(np.uint8) for image in out]


def random_crops(
    photos: Sequence[np.ndarray], count: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` square crops of `size` pixels, each from a photograph chosen at random,
    flipped left to right half of the time: `(count, 3, size, size)` in `[-1, 1]`."""
    crops = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        top = rng.integers(photo.shape[0] - size + 1)
        left = rng.integers(photo.shape[1] - size + 1)
        crop = photo[top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops[i] = np.transpose(crop, (2, 0, 1)) / 127.5 - 1.0
    return crops


def batches(array: np.ndarray, size: int) -> list[np.ndarray]:
    """`array` in batches of `size` along the first axis, the last padded by repeating
    its first rows, so that every batch has one shape (one compilation)."""
    out = []
    for start in range(0, len(array), size):
        batch = array[start : start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, array[: size - len(batch)]])
        out.append(batch)
    return out


# Model ----------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of `1000 t` at `dim // 2` geometrically spaced frequencies."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class FiLM(eqx.Module):
    """A per-channel scale and shift of a feature map, computed from the timestep's
    embedding. It starts as the identity (zero weights), so the network starts as an
    unconditioned U-Net and learns how much each block depends on the timestep."""

    linear: eqx.nn.Linear

    def __init__(self, embed_dim: int, channels: int, *, key: jax.Array):
        linear = eqx.nn.Linear(embed_dim, 2 * channels, key=key)
        self.linear = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            linear,
            (jnp.zeros_like(linear.weight), jnp.zeros((2 * channels,))),
        )

    def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(embedding), 2)
        return h * (1.0 + scale[:, None, None]) + shift[:, None, None]


class UNet(eqx.Module):
    """A two-level U-Net on `(latent_channels, h, w)` latents (`h`, `w` even) and a
    timestep `t` in `[0, 1]`: ResNet blocks at full and half resolution, attention at
    half resolution, eqx_vae's mid block between, skip connections concatenated on the
    way up. Every block is an eqx_vae block called as `block(x, policy=...)`; the
    timestep enters through a `FiLM` after each ResNet block and the mid block."""

    time_mlp: eqx.nn.MLP
    conv_in: eqx.nn.Conv2d
    down_resnets: tuple[eqx_vae.ResnetBlock2D, eqx_vae.ResnetBlock2D]
    down_films: tuple[FiLM, FiLM]
    downsampler: eqx_vae.Downsample2D
    down_attention: eqx_vae.AttentionBlock
    mid_block: eqx_vae.MidBlock2D
    mid_film: FiLM
    up_resnets: tuple[eqx_vae.ResnetBlock2D, eqx_vae.ResnetBlock2D]
    up_films: tuple[FiLM, FiLM]
    up_attention: eqx_vae.AttentionBlock
    upsampler: eqx_vae.Upsample2D
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d
    width: int = eqx.field(static=True)

    def __init__(self, channels: int, width: int, groups: int = 8, *, key: jax.Array):
        keys = iter(jax.random.split(key, 17))
        w, embed = width, 4 * width
        self.width = width
        self.time_mlp = eqx.nn.MLP(
            w, embed, embed, depth=1, activation=jax.nn.silu, key=next(keys)
        )
        self.conv_in = eqx.nn.Conv2d(channels, w, 3, padding=1, key=next(keys))
        self.down_resnets = (
            eqx_vae.ResnetBlock2D(w, w, groups, key=next(keys)),
            eqx_vae.ResnetBlock2D(w, 2 * w, groups, key=next(keys)),
        )
        self.down_films = (FiLM(embed, w, key=next(keys)), FiLM(embed, 2 * w, key=next(keys)))
        self.downsampler = eqx_vae.Downsample2D(w, key=next(keys))
        self.down_attention = eqx_vae.AttentionBlock(2 * w, groups, key=next(keys))
        self.mid_block = eqx_vae.MidBlock2D(2 * w, groups, key=next(keys))
        self.mid_film = FiLM(embed, 2 * w, key=next(keys))
        self.up_resnets = (
            eqx_vae.ResnetBlock2D(4 * w, 2 * w, groups, key=next(keys)),
            eqx_vae.ResnetBlock2D(3 * w, w, groups, key=next(keys)),
        )
        self.up_films = (FiLM(embed, 2 * w, key=next(keys)), FiLM(embed, w, key=next(keys)))
        self.up_attention = eqx_vae.AttentionBlock(2 * w, groups, key=next(keys))
        self.upsampler = eqx_vae.Upsample2D(2 * w, key=next(keys))
        self.norm_out = eqx.nn.GroupNorm(groups, w)
        conv_out = eqx.nn.Conv2d(w, channels, 3, padding=1, key=next(keys))
        # A zero output layer: the first prediction is v = 0 everywhere.
        self.conv_out = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            conv_out,
            (jnp.zeros_like(conv_out.weight), jnp.zeros((channels, 1, 1))),
        )

    def __call__(
        self, z: jax.Array, t: jax.Array, *, policy: eqx_vae.Policy | None = None
    ) -> jax.Array:
        """The predicted `v` for one latent `z` `(channels, h, w)` at time `t` (a
        scalar)."""
        emb = jax.nn.silu(self.time_mlp(timestep_embedding(t, self.width)))
        h = self.conv_in(z)
        h = self.down_films[0](self.down_resnets[0](h, policy=policy), emb)
        skip_full = h
        h = self.downsampler(h, policy=policy)
        h = self.down_films[1](self.down_resnets[1](h, policy=policy), emb)
        h = self.down_attention(h, policy=policy)
        skip_half = h
        h = self.mid_film(self.mid_block(h, policy=policy), emb)
        h = jnp.concatenate([h, skip_half])
        h = self.up_films[0](self.up_resnets[0](h, policy=policy), emb)
        h = self.upsampler(self.up_attention(h, policy=policy), policy=policy)
        h = jnp.concatenate([h, skip_full])
        h = self.up_films[1](self.up_resnets[1](h, policy=policy), emb)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(z.dtype)


# Diffusion ------------------------------------------------------------------------------


def alpha_sigma(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cosine schedule in continuous time: `z_t = alpha z_0 + sigma noise` with
    `alpha^2 + sigma^2 = 1`, pure data at `t = 0` and pure noise at `t = 1`."""
    return jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)


def diffusion_loss(
    model: UNet,
    vae: eqx_vae.AutoencoderKL,
    mean: jax.Array,
    std: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """The v-prediction loss on a batch of posteriors `(mean, std)` of raw latents: a
    sample of each posterior, scaled, noised at a uniformly drawn time."""
    k_latent, k_time, k_noise = jax.random.split(key, 3)
    z0 = vae.scale_latents(mean + std * jax.random.normal(k_latent, mean.shape))
    t = jax.random.uniform(k_time, (z0.shape[0],))
    noise = jax.random.normal(k_noise, z0.shape)
    alpha, sigma = (a[:, None, None, None] for a in alpha_sigma(t))
    v = alpha * noise - sigma * z0
    predicted = jax.vmap(model)(alpha * z0 + sigma * noise, t)
    return jnp.mean(jnp.square(predicted - v))


def ddim_sample(model: UNet, noise: jax.Array, steps: int) -> jax.Array:
    """Deterministic DDIM from `noise` `(batch, channels, h, w)` at `t = 1` to `t = 0`
    in `steps` equal steps of time: at each, the prediction gives the clean latent and
    the noise, which are recombined at the next time."""
    times = jnp.linspace(1.0, 0.0, steps + 1)

    def step(z: jax.Array, ts: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        t, s = ts
        v = jax.vmap(lambda zi: model(zi, t))(z)
        alpha_t, sigma_t = alpha_sigma(t)
        alpha_s, sigma_s = alpha_sigma(s)
        clean = alpha_t * z - sigma_t * v
        eps = sigma_t * z + alpha_t * v
        return alpha_s * clean + sigma_s * eps, None

    z, _ = jax.lax.scan(step, noise, (times[:-1], times[1:]))
    return z


def generate(model: UNet, vae: eqx_vae.AutoencoderKL, noise: jax.Array, steps: int) -> jax.Array:
    """Images `(batch, 3, H, W)` from `noise` `(batch, channels, h, w)`: DDIM in the
    scaled latent space, then the autoencoder's `unscale_latents` and `decode`."""
    z = ddim_sample(model, noise, steps)
    return jax.vmap(vae.decode)(vae.unscale_latents(z))


def jit(fn: Callable) -> Callable:
    """`eqx.filter_jit` under the compiler options eqx_vae recommends for the backend
    (on CPU, XLA's own convolution kernels, which are faster for these shapes)."""
    # Equinox's overloads leave out the keyword arguments it passes on to `jax.jit`.
    return eqx.filter_jit(fn, compiler_options=eqx_vae.compiler_options())  # pyright: ignore[reportCallIssue]


# Training -------------------------------------------------------------------------------


def make_train_step(optimizer: Any) -> Any:
    """One compiled step: a batch drawn from the dataset's posteriors (kept on the
    device), the loss and its gradient, the optimiser update and the EMA update."""

    def train_step(
        model: UNet,
        ema: UNet,
        opt_state: Any,
        vae: eqx_vae.AutoencoderKL,
        means: jax.Array,
        stds: jax.Array,
        step: jax.Array,
        key: jax.Array,
        batch_size: int,
    ) -> tuple[UNet, UNet, Any, jax.Array]:
        k_batch, k_loss = jax.random.split(key)
        index = jax.random.randint(k_batch, (batch_size,), 0, means.shape[0])
        loss, grads = eqx.filter_value_and_grad(diffusion_loss)(
            model, vae, means[index], stds[index], k_loss
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        # EMA with a warm-up: early on it follows the weights closely.
        decay = jnp.minimum(0.999, (1.0 + step) / (10.0 + step))
        ema_params = jax.tree_util.tree_map(
            lambda e, p: decay * e + (1.0 - decay) * p,
            eqx.filter(ema, eqx.is_inexact_array),
            eqx.filter(model, eqx.is_inexact_array),
        )
        ema = eqx.combine(ema_params, ema)
        return model, ema, opt_state, loss

    return jit(train_step)


def write_grid(path: pathlib.Path, images: np.ndarray) -> None:
    """`GRID * GRID` images `(n, 3, s, s)` in `[-1, 1]` as one PNG, row by row."""
    from PIL import Image

    _, c, s, _ = images.shape
    grid = images[: GRID * GRID].reshape(GRID, GRID, c, s, s)
    grid = np.transpose(grid, (0, 3, 1, 4, 2)).reshape(GRID * s, GRID * s, c)
    pixels = np.clip((grid + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="runs/latent_diffusion", help="the run's folder")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=64, help="a multiple of 8")
    parser.add_argument("--crops", type=int, default=512, help="crops in the dataset")
    parser.add_argument("--width", type=int, default=32, help="the U-Net's first width")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.crop_size % 8:
        parser.error(f"--crop-size must be a multiple of 8, got {args.crop_size}.")
    if args.width % 8:
        parser.error(f"--width must be a multiple of 8 (GroupNorm groups), got {args.width}.")
    import optax  # pyright: ignore[reportMissingImports]

    from eqx_vae.train import plot_losses

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    key_model, key_train, key_sample = jax.random.split(jax.random.key(args.seed), 3)

    # The dataset: random crops, their latent statistics, and their posteriors, encoded
    # once, in batches of one shape.
    crops = random_crops(
        photographs(), args.crops, args.crop_size, np.random.default_rng(args.seed)
    )
    vae = eqx_vae.load_builtin()
    chunk = min(64, args.crops)
    stats = eqx_vae.latent_statistics(
        vae, (crops[i : i + chunk] for i in range(0, args.crops, chunk))
    )
    # Per-channel centring and scaling (Playground v2.5's convention): the built-in
    # model's stored `scaling_factor` gives unit spread over all channels together, but
    # its channels have means away from zero and spreads of their own (on the default
    # crops, means 0.1, -3.5, -2.5, 1.1 and standard deviations 9.0, 9.9, 9.2, 3.2);
    # diffusion's noise is zero-mean and unit-variance in every channel, so the latent
    # should be too.
    vae = eqx_vae.apply_latent_statistics(vae, stats, "per_channel")
    encode = jit(lambda m, x: jax.vmap(m.encode)(x))
    means, logvars = [], []
    for batch in batches(crops, chunk):
        posterior = encode(vae, jnp.asarray(batch))
        means.append(posterior.mean)
        logvars.append(posterior.logvar)
    means = jnp.concatenate(means)[: args.crops]
    stds = jnp.exp(0.5 * jnp.concatenate(logvars)[: args.crops])
    encoded = time.perf_counter()
    print(
        f"encoded {args.crops} crops of {args.crop_size} px to latents "
        f"{tuple(means.shape[1:])} in {encoded - began:.1f} s; per-channel mean "
        f"{np.round(stats.mean, 2).tolist()}, std {np.round(stats.std, 2).tolist()}"
    )

    # Training.
    model = UNet(vae.latent_channels, args.width, key=key_model)
    ema = model
    warmup = max(1, min(100, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        args.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(args.steps, warmup + 1),
        end_value=0.1 * args.learning_rate,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    train_step = make_train_step(optimizer)
    log_every = max(1, args.steps // 100)
    print_every = max(1, args.steps // 10)
    records, window = [], []
    metrics_path = out / "metrics.jsonl"
    with metrics_path.open("w") as metrics:
        for step in range(args.steps):
            model, ema, opt_state, loss = train_step(
                model,
                ema,
                opt_state,
                vae,
                means,
                stds,
                jnp.asarray(step, jnp.float32),
                jax.random.fold_in(key_train, step),
                args.batch_size,
            )
            window.append(loss)
            if (step + 1) % log_every == 0 or step + 1 == args.steps:
                record = {"step": step + 1, "loss": float(np.mean(jax.device_get(window)))}
                window = []
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
                if (step + 1) % print_every == 0 or step + 1 == args.steps:
                    rate = (step + 1) / (time.perf_counter() - encoded)
                    print(
                        f"step {step + 1}/{args.steps}: loss {record['loss']:.4f} "
                        f"({rate:.2f} steps/s)",
                        flush=True,
                    )
    trained = time.perf_counter()
    plot_losses(metrics_path, out / "losses.png", keys=("loss",))

    # Sampling: DDIM with the EMA weights from a fixed key, then decoding.
    generate_images = jit(generate)
    decode = jit(lambda m, z: jax.vmap(m.decode)(z))
    noise = jax.random.normal(key_sample, (GRID * GRID, *means.shape[1:]))
    samples = generate_images(ema, vae, noise, args.sample_steps)
    write_grid(out / "samples.png", np.asarray(samples))
    reference = decode(vae, means[np.arange(GRID * GRID) % args.crops])
    write_grid(out / "reference.png", np.asarray(reference))
    finished = time.perf_counter()

    summary = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "crop_size": args.crop_size,
        "crops": args.crops,
        "seed": args.seed,
        "final_loss": records[-1]["loss"] if records else None,
        "parameters": sum(
            x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        ),
        "encode_seconds": encoded - began,
        "train_seconds": trained - encoded,
        "sample_seconds": finished - trained,
        "seconds": finished - began,
        "latent_mean": [float(m) for m in stats.mean],
        "latent_std": [float(s) for s in stats.std],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/samples.png, reference.png, losses.png and summary.json")
    return summary


if __name__ == "__main__":
    main()
