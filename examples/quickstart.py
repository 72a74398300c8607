"""Encode a batch of images to latents and decode them back with eqx_vae.

    python examples/quickstart.py                  # a small random model, seconds on a CPU
    python examples/quickstart.py --preset sd15    # the SD 1.x architecture (random weights)

The weights here are random, so the reconstruction is noise; load published weights
with `eqx_vae.from_diffusers_state_dict` to get real reconstructions.
"""

import argparse
import pathlib
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_vae


def test_pattern(height: int, width: int, phase: float) -> np.ndarray:
    """A synthetic RGB image in [-1, 1], channels-first: gradients and a disc."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(np.float64)
    image = np.stack([x, y, 0.5 * np.sin(8 * np.pi * (x + y) + phase) + 0.5 * disc])
    return (2 * image - 1).clip(-1, 1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description="Encode and decode a batch with eqx_vae.")
    parser.add_argument(
        "--preset",
        choices=["tiny", *eqx_vae.PRESETS],
        default="tiny",
        help="the architecture to build (default: a small two-level model)",
    )
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    args = parser.parse_args()

    if args.preset == "tiny":
        config = eqx_vae.AutoencoderKLConfig(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=16,
        )
    else:
        config = getattr(eqx_vae.AutoencoderKLConfig, args.preset)()

    start = time.perf_counter()
    model = eqx_vae.AutoencoderKL.from_config(config, key=jax.random.key(0))
    params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))
    print(f"built {args.preset}: {params:,} parameters in {time.perf_counter() - start:.2f} s")

    images = jnp.stack([test_pattern(args.size, args.size, i) for i in range(args.batch)])

    # Everything is unbatched; jax.vmap makes it batched and filter_jit compiles it.
    @eqx.filter_jit
    def encode(model, images, key):
        posterior = jax.vmap(model.encode)(images)
        keys = jax.random.split(key, images.shape[0])
        z = jax.vmap(lambda p, k: p.sample(k))(posterior, keys)
        return model.scale_latents(z), posterior.kl()

    @eqx.filter_jit
    def decode(model, latents):
        return jax.vmap(model.decode)(model.unscale_latents(latents))

    start = time.perf_counter()
    latents, kl = encode(model, images, jax.random.key(1))
    latents.block_until_ready()
    print(
        f"encoded {images.shape} -> latents {latents.shape} in "
        f"{time.perf_counter() - start:.2f} s (with compilation); "
        f"scaled latent std {float(latents.std()):.3f}, KL per image {np.asarray(kl).round(1)}"
    )
    start = time.perf_counter()
    recon = decode(model, latents).block_until_ready()
    print(f"decoded -> {recon.shape} in {time.perf_counter() - start:.2f} s (with compilation)")

    # Serving: a decoder compiled ahead of time for this shape, under the backend's
    # compiler options, that returns 8-bit pixels (converted on the device).
    start = time.perf_counter()
    size = (args.size, args.size)
    to_pixels = eqx_vae.compile(model, "decode", size, batch=args.batch, pixels=True)
    compiled = time.perf_counter()
    pixels = to_pixels(model.unscale_latents(latents)).block_until_ready()
    print(
        f"compiled a {size[0]}x{size[1]} decoder to 8-bit pixels in {compiled - start:.2f} s; "
        f"decoded -> {pixels.shape} {pixels.dtype} in {time.perf_counter() - compiled:.2f} s"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.eqx"
        eqx_vae.save(path, model)
        again = eqx_vae.load(path)
        same = bool(jnp.array_equal(decode(again, latents), recon))
        print(
            f"saved and reloaded {path.stat().st_size / 2**20:.1f} MiB; identical output: {same}"
        )


if __name__ == "__main__":
    main()
