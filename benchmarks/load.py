"""Loading an SD-size VAE (83.7M parameters) from safetensors: eqx_vae against diffusers.

    python benchmarks/load.py [--repeats 5] [--folder DIR]

Writes a random SD 1.x-architecture VAE as a diffusers folder and as a single file
(unless `--folder` names an existing diffusers folder), then loads it in fresh child
processes, alternating the implementations, and prints the median wall time of the
load call and the resident memory it added on top of the process after its imports
(the interpreter and framework baseline), next to the file size. Needs the `bench`
extra (torch, diffusers, accelerate).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, machine, peak_rss_mib, rss_mib, run_child, table, versions


def child(kind: str, folder: pathlib.Path) -> None:
    if kind.startswith("eqx"):
        import jax
        import jax.numpy as jnp

        import eqx_vae

        jnp.zeros(1).block_until_ready()  # start the runtime before measuring
        base = rss_mib()
        with Timer() as t:
            if kind == "eqx load_diffusers":
                model = eqx_vae.load_diffusers(folder)
            else:
                model = eqx_vae.load_single_file(folder / "vae.safetensors", preset="sd15")
            jax.block_until_ready(model)
    else:
        import torch
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

        torch.zeros(1)
        base = rss_mib()
        with Timer() as t:
            model = AutoencoderKL.from_pretrained(folder)
            # diffusers maps the file and reads a parameter's pages only when it is first
            # used; touch every parameter so that both have the weights in memory.
            with torch.no_grad():
                total = sum(float(p.sum()) for p in model.parameters())
        del total
    print(
        json.dumps(
            {"seconds": t.seconds, "base": base, "peak": peak_rss_mib(), "after": rss_mib()}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Loading an SD-size VAE: eqx_vae vs diffusers.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=pathlib.Path)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], pathlib.Path(args.child[1]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            import jax

            import eqx_vae

            folder = pathlib.Path(tmp)
            model = eqx_vae.AutoencoderKL(
                eqx_vae.AutoencoderKLConfig.sd15(), key=jax.random.key(0)
            )
            eqx_vae.save_diffusers(folder, model)
            eqx_vae.save_single_file(folder / "vae.safetensors", model)
            del model
        size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
        kinds = ["eqx load_diffusers", "diffusers from_pretrained"]
        if (folder / "vae.safetensors").is_file():
            kinds.insert(1, "eqx load_single_file")
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                results[kind].append(run_child(__file__, ["--child", kind, str(folder)]))

    rows = []
    reference = statistics.median(r["seconds"] for r in results["diffusers from_pretrained"])
    for kind, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        added = statistics.median(r["peak"] - r["base"] for r in runs)
        rows.append(
            [
                kind,
                f"{seconds:.3f} s",
                f"{reference / seconds:.2f}x",
                f"{added:.0f} MiB ({added / size:.2f}x file)",
                f"{statistics.median(r['peak'] for r in runs):.0f} MiB",
                f"{statistics.median(r['base'] for r in runs):.0f} MiB",
            ]
        )
    print(f"Machine: {machine()}; {versions('jax', 'equinox', 'torch', 'diffusers')}")
    print(
        f"File: {size:.1f} MiB float32 safetensors; median of {args.repeats} fresh processes each"
    )
    print(f"Threads: {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print(
        table(
            [
                "loader",
                "load time",
                "speed vs diffusers",
                "peak RSS added",
                "peak RSS",
                "RSS after imports",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
