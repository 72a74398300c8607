"""`eqx-vae reconstruct` on a folder of photographs of many sizes, as a new user runs
it: a fresh process, the built-in model, no compilation cache. Reports the wall time,
the time per image, how many programs XLA compiled and how long that took.

    python benchmarks/folder.py [--images 100] [--min-size 160] [--max-size 640]

The photographs are random crops, of random sizes, of scikit-image's sample photographs.
"""

import argparse
import json
import pathlib
import sys
import tempfile


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, machine, run_child, versions


PHOTOGRAPHS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)


def make_folder(folder: pathlib.Path, count: int, low: int, high: int, seed: int) -> set:
    """`count` crops of random sizes in `[low, high]` pixels; returns their sizes."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOGRAPHS]
    folder.mkdir(parents=True, exist_ok=True)
    sizes = set()
    for i in range(count):
        photo = photos[i % len(photos)]
        h = int(rng.integers(low, min(high, photo.shape[0]) + 1))
        w = int(rng.integers(low, min(high, photo.shape[1]) + 1))
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        Image.fromarray(photo[top : top + h, left : left + w, :3]).save(folder / f"{i:03d}.png")
        sizes.add((h, w))
    return sizes


def child(folder: str, out: str) -> None:
    """Runs the command line in this process, counting XLA's compilations."""
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration_secs, **_: (
            compiles.append(duration_secs)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    from eqx_vae.cli import main

    status = main(["reconstruct", folder, out])
    print(json.dumps({"status": status, "compiles": len(compiles), "compile": sum(compiles)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "photos"
        sizes = make_folder(folder, args.images, args.min_size, args.max_size, args.seed)
        env = {"EQX_VAE_NO_COMPILATION_CACHE": "1", "JAX_ENABLE_COMPILATION_CACHE": "false"}
        with Timer() as wall:
            r = run_child(__file__, ["--child", str(folder), str(pathlib.Path(tmp) / "out")], env)
    print(f"Machine: {machine()}; {versions('jax', 'equinox', 'eqx_vae')}")
    print(
        f"eqx-vae reconstruct on {args.images} photographs of {len(sizes)} sizes "
        f"({args.min_size}-{args.max_size} px): {wall.seconds:.1f} s "
        f"({wall.seconds / args.images:.2f} s an image), {r['compiles']} XLA compilations "
        f"taking {r['compile']:.1f} s, exit status {r['status']}"
    )


if __name__ == "__main__":
    main()
