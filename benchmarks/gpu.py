"""Encode and decode on a GPU: eqx_vae (`eqx_vae.compile`) against diffusers' PyTorch
VAE (its attention through `scaled_dot_product_attention`), bfloat16 and float32, at
512 and 1024 px, with eqx_vae's compile times. `benchmarks/gpu.sh` installs what this
needs on a bare GPU machine and runs it.

    python benchmarks/gpu.py [--sizes 512 1024] [--repeats 5] [--json out.json]

Each implementation runs in its own process (JAX and PyTorch would otherwise compete
for the GPU's memory). Runs on CPU too (`--sizes 64`), which checks the script.
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, run_child, table
from inference import inputs, time_runs


DTYPES = ("bfloat16", "float32")


def eqx_child(folder: pathlib.Path, sizes: list[int], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import eqx_vae

    model = eqx_vae.load_diffusers(folder)
    out: dict = {"device": str(jax.devices()[0].device_kind), "ops": {}}
    for dtype in DTYPES:
        for size in sizes:
            for op in ("encode", "decode"):
                x = jnp.asarray(inputs(op, size))
                with Timer() as compile_time:
                    program = eqx_vae.compile(
                        model, op, (size, size), batch=1, dtype=getattr(jnp, dtype)
                    )
                if op == "encode":
                    run = lambda p=program, x=x: p(x).mean.block_until_ready()  # noqa: E731
                else:
                    run = lambda p=program, x=x: p(x).block_until_ready()  # noqa: E731
                out["ops"][f"{dtype} {op} {size}"] = {
                    "times": time_runs(run, repeats),
                    "compile": compile_time.seconds,
                }
    return out


def torch_child(folder: pathlib.Path, sizes: list[int], repeats: int) -> dict:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "ops": {},
    }
    for dtype in DTYPES:
        model = AutoencoderKL.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
        model = model.to(device).eval()  # pyright: ignore[reportCallIssue, reportArgumentType]
        for size in sizes:
            for op in ("encode", "decode"):
                x = torch.from_numpy(inputs(op, size)).to(device, getattr(torch, dtype))

                def run(x=x, op=op, model=model):
                    with torch.no_grad():
                        y = (
                            model.encode(x).latent_dist.mean  # pyright: ignore
                            if op == "encode"
                            else model.decode(x).sample  # pyright: ignore
                        )
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return y

                out["ops"][f"{dtype} {op} {size}"] = {"times": time_runs(run, repeats)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="GPU encode/decode: eqx_vae vs diffusers.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder = args.child
        fn = eqx_child if kind == "eqx_vae" else torch_child
        print(json.dumps(fn(pathlib.Path(folder), args.sizes, args.repeats)))
        return

    import jax

    import eqx_vae

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "vae"
        model = eqx_vae.AutoencoderKL(eqx_vae.AutoencoderKLConfig.sd15(), key=jax.random.key(0))
        eqx_vae.save_diffusers(folder, model)
        del model
        common = ["--sizes", *map(str, args.sizes), "--repeats", str(args.repeats)]
        results = {
            kind: run_child(__file__, ["--child", kind, str(folder), *common])
            for kind in ("eqx_vae", "torch")
        }
    ours, theirs = results["eqx_vae"], results["torch"]
    rows = []
    for name, r in ours["ops"].items():
        mine = statistics.median(r["times"])
        other = statistics.median(theirs["ops"][name]["times"])
        rows.append(
            [
                name,
                f"{mine * 1e3:.1f} ms",
                f"{other * 1e3:.1f} ms",
                f"{other / mine:.2f}x",
                f"{r['compile']:.1f} s",
            ]
        )
    print(f"eqx_vae on {ours['device']}, diffusers on {theirs['device']}; SD-size VAE, batch 1,")
    print(f"median of {args.repeats} runs after a warm-up; ratio: diffusers' time / eqx_vae's.")
    print()
    print(table(["operation", "eqx_vae", "diffusers (SDPA)", "ratio", "eqx_vae compile"], rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
