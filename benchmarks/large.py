"""Large images in bounded memory: tiled decoding of an SD-size VAE.

    python benchmarks/large.py [--size 2048] [--tile 256] [--compare 1024]

1. Decodes a `--size` x `--size` image (a random latent, random SD 1.x-architecture
   weights) with `eqx_vae.tiled_decode` in a fresh process, and reports the time and
   the peak resident memory of that process.
2. At `--compare` pixels, where the untiled decode also fits, decodes the same latent
   whole and tiled (with whole-image GroupNorm statistics, and with per-tile ones as
   diffusers' tiling does) and reports the largest absolute difference and the PSNR
   of each tiled result against the whole one.
"""

import argparse
import json
import pathlib
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, machine, peak_rss_mib, rss_mib, run_child, table, versions


def child(mode: str, size: int, tile: int, out: str) -> None:
    import equinox as eqx
    import jax

    import eqx_vae

    model = eqx_vae.AutoencoderKL(eqx_vae.AutoencoderKLConfig.sd15(), key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, size // 8, size // 8))
    params, static = eqx.partition(model, eqx.is_array)
    if mode == "whole":
        fn = lambda p, z: eqx.combine(p, static).decode(z)  # noqa: E731
    else:
        exact = mode == "tiled"
        fn = lambda p, z: eqx_vae.tiled_decode(  # noqa: E731
            eqx.combine(p, static), z, tile_size=tile, exact_statistics=exact
        )
    base = rss_mib()
    with Timer() as compile_time:
        compiled = (
            jax.jit(fn).lower(params, z).compile(compiler_options=eqx_vae.compiler_options())
        )
    with Timer() as run_time:
        image = compiled(params, z).block_until_ready()
    if out:
        np.save(out, np.asarray(image))
    report = {
        "seconds": run_time.seconds,
        "compile": compile_time.seconds,
        "peak_rss": peak_rss_mib(),
        "rss_before": base,
        "shape": list(image.shape),
        "finite": bool(np.isfinite(np.asarray(image)).all()),
    }
    print(json.dumps(report))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(10 * np.log10((b.max() - b.min()) ** 2 / np.mean((a - b) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Tiled decoding of large images.")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--compare", type=int, default=1024)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, size, tile, out = args.child
        child(mode, int(size), int(tile), out)
        return

    import tempfile

    print(f"Machine: {machine()}; {versions('jax', 'equinox')}\n")
    big = run_child(__file__, ["--child", "tiled", str(args.size), str(args.tile), ""])
    print(
        table(
            ["decode", "tile", "time", "peak RSS", "output"],
            [
                [
                    f"{args.size}x{args.size}, tiled",
                    f"{args.tile} px",
                    f"{big['seconds']:.0f} s (+{big['compile']:.0f} s compile)",
                    f"{big['peak_rss']:.0f} MiB",
                    f"{big['shape']}, finite: {big['finite']}",
                ]
            ],
        )
    )
    print()
    with tempfile.TemporaryDirectory() as tmp:
        runs, images = {}, {}
        for mode in ("whole", "tiled", "per-tile"):
            path = str(pathlib.Path(tmp) / f"{mode}.npy")
            runs[mode] = run_child(
                __file__, ["--child", mode, str(args.compare), str(args.tile), path]
            )
            images[mode] = np.load(path)
    rows = []
    for mode, label in (
        ("whole", "whole"),
        ("tiled", "tiled, whole-image statistics"),
        ("per-tile", "tiled, per-tile statistics"),
    ):
        r = runs[mode]
        if mode == "whole":
            difference = "-"
        else:
            error = float(np.max(np.abs(images[mode] - images["whole"])))
            difference = f"max abs {error:.1e}, PSNR {psnr(images[mode], images['whole']):.1f} dB"
        rows.append([label, f"{r['seconds']:.0f} s", f"{r['peak_rss']:.0f} MiB", difference])
    print(f"Decoding {args.compare}x{args.compare}, tile {args.tile} px:\n")
    print(table(["decode", "time", "peak RSS", "against whole"], rows))


if __name__ == "__main__":
    main()
