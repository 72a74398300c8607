"""Encode and decode an SD-size VAE: eqx_vae against diffusers (PyTorch, NCHW and
channels-last) and diffusers' Flax VAE, on the same weights and inputs.

    pip install -e ".[bench]"
    python benchmarks/inference.py [--repeats 3] [--sizes 256 512] [--skip flax]

Each implementation runs in its own fresh process (so that memory readings are its
own), with the same number of threads. The script prints, per implementation: model
construction time (random initialisation), compile time where there is one, the
median time of each operation and its ratio to eqx_vae, achieved GFLOP/s (from XLA's
cost analysis of the eqx_vae program) against the measured float32 matmul ceiling, the
peak resident memory of the process (whose largest operation is the last, the
largest decode), and the largest difference of each output from eqx_vae's.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, machine, peak_rss_mib, run_child, table, versions


IMPLEMENTATIONS = ("eqx_vae", "torch", "torch_cl", "flax")


def operations(sizes: list[int]) -> list[tuple[str, int]]:
    return [(op, size) for size in sizes for op in ("encode", "decode")]


def inputs(op: str, size: int) -> np.ndarray:
    """The same image in [-1, 1] or latent for every implementation, batch of one, NCHW."""
    rng = np.random.default_rng(size + (0 if op == "encode" else 1))
    if op == "encode":
        return rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    return rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)


def time_runs(fn, repeats: int) -> list[float]:
    fn()  # warm-up (and, for the compiled implementations, compilation)
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return times


def memory_child(kind: str, folder: pathlib.Path, size: int) -> None:
    """Loads the weights and decodes one latent of `size` pixels, nothing else: the
    process's peak memory is that of this decode."""
    latent = inputs("decode", size)
    if kind == "eqx_vae":
        import equinox as eqx
        import jax

        import eqx_vae

        model = eqx_vae.load_diffusers(folder)
        options = eqx_vae.compiler_options()
        # The model is an argument, not a closed-over constant, of the compiled function.
        decode = eqx.filter_jit(lambda m, z: jax.vmap(m.decode)(z), compiler_options=options)  # pyright: ignore[reportCallIssue]
        decode(model, latent).block_until_ready()
    elif kind.startswith("torch"):
        import torch
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

        layout = torch.channels_last if kind == "torch_cl" else torch.contiguous_format
        model = AutoencoderKL.from_pretrained(folder).eval()
        model = model.to(memory_format=layout)  # pyright: ignore[reportCallIssue]
        with torch.no_grad():
            model.decode(torch.from_numpy(latent).to(memory_format=layout))
    else:
        import jax
        import safetensors.torch
        from diffusers import FlaxAutoencoderKL  # pyright: ignore
        from diffusers.models.modeling_flax_pytorch_utils import (  # pyright: ignore
            convert_pytorch_state_dict_to_flax,
        )

        model = FlaxAutoencoderKL(**_flax_config(folder))
        state = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
        params = convert_pytorch_state_dict_to_flax(state, model)
        del state
        decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode).sample)
        jax.block_until_ready(decode(params, latent))
    print(json.dumps({"peak_rss": peak_rss_mib()}))


def _flax_config(folder: pathlib.Path) -> dict:
    """The config.json fields that diffusers' Flax VAE takes."""
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    for unsupported in (
        "shift_factor",
        "latents_mean",
        "latents_std",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ):
        config.pop(unsupported, None)
    return config


def child(
    kind: str, folder: pathlib.Path, sizes: list[int], repeats: int, out: pathlib.Path
) -> None:
    result: dict = {"kind": kind, "ops": {}}
    if kind == "eqx_vae":
        result.update(_eqx_child(folder, sizes, repeats, out))
    elif kind.startswith("torch"):
        result.update(_torch_child(folder, sizes, repeats, out, channels_last=kind == "torch_cl"))
    else:
        result.update(_flax_child(folder, sizes, repeats, out))
    result["peak_rss"] = peak_rss_mib()
    print(json.dumps(result))


def _eqx_child(folder, sizes, repeats, out) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_vae

    jnp.zeros(1).block_until_ready()
    config = eqx_vae.AutoencoderKLConfig.sd15()
    with Timer() as construct:
        jax.block_until_ready(eqx_vae.AutoencoderKL(config, key=jax.random.key(1)))
    model = eqx_vae.load_diffusers(folder)
    params, static = eqx.partition(model, eqx.is_array)
    options = eqx_vae.compiler_options()
    fns = {
        "encode": lambda p, x: jax.vmap(eqx.combine(p, static).encode)(x).mean,
        "decode": lambda p, z: jax.vmap(eqx.combine(p, static).decode)(z),
    }
    ops, flops = {}, {}
    for op, size in operations(sizes):
        x = jnp.asarray(inputs(op, size))
        with Timer() as compile_time:
            compiled = jax.jit(fns[op]).lower(params, x).compile(compiler_options=options)
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        flops[f"{op}{size}"] = float(cost.get("flops", float("nan")))
        times = time_runs(lambda c=compiled, x=x: c(params, x).block_until_ready(), repeats)
        np.save(out / f"eqx_vae_{op}{size}.npy", np.asarray(compiled(params, x)))
        ops[f"{op}{size}"] = {"times": times, "compile": compile_time.seconds}
    return {
        "construct": construct.seconds,
        "ops": ops,
        "flops": flops,
        "ceiling": _jax_ceiling(options),
    }


def _jax_ceiling(options) -> float:
    """float32 matmul GFLOP/s of XLA on this machine (the best of a few sizes)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in (2048, 4096):
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a).lower(a).compile(compiler_options=options)
        seconds = min(time_runs(lambda f=f, a=a: f(a).block_until_ready(), 3))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def _torch_child(folder, sizes, repeats, out, channels_last: bool) -> dict:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    torch.set_num_threads(os.cpu_count() or 1)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with Timer() as construct:
        AutoencoderKL(**config)  # pyright: ignore[reportCallIssue]
    model = AutoencoderKL.from_pretrained(folder).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)  # pyright: ignore[reportCallIssue]
    ops = {}
    for op, size in operations(sizes):
        x = torch.from_numpy(inputs(op, size)).to(memory_format=layout)

        def run(x=x, op=op):
            with torch.no_grad():
                if op == "encode":
                    return model.encode(x).latent_dist.mean  # pyright: ignore
                return model.decode(x).sample  # pyright: ignore

        times = time_runs(run, repeats)
        np.save(out / f"{'torch_cl' if channels_last else 'torch'}_{op}{size}.npy", run().numpy())
        ops[f"{op}{size}"] = {"times": times}
    return {"construct": construct.seconds, "ops": ops, "ceiling": _torch_ceiling()}


def _torch_ceiling() -> float:
    import torch

    best = 0.0
    for n in (2048, 4096):
        a = torch.ones((n, n))
        seconds = min(time_runs(lambda a=a: a @ a, 3))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def _flax_child(folder, sizes, repeats, out) -> dict:
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxAutoencoderKL  # pyright: ignore

    config = _flax_config(folder)
    with Timer() as construct:
        fresh = FlaxAutoencoderKL(**config)
        jax.block_until_ready(fresh.init_weights(jax.random.key(1)))
    # from_pretrained(from_pt=True) wants a pickled .bin; convert the safetensors instead.
    import safetensors.torch
    from diffusers.models.modeling_flax_pytorch_utils import (  # pyright: ignore
        convert_pytorch_state_dict_to_flax,
    )

    model = FlaxAutoencoderKL(**config)
    state = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    params = convert_pytorch_state_dict_to_flax(state, model)
    fns = {
        "encode": lambda p, x: model.apply({"params": p}, x, method=model.encode).latent_dist.mean,
        "decode": lambda p, z: model.apply({"params": p}, z, method=model.decode).sample,
    }
    ops = {}
    for op, size in operations(sizes):
        x = jnp.asarray(inputs(op, size))
        with Timer() as compile_time:
            compiled = jax.jit(fns[op]).lower(params, x).compile()
        times = time_runs(lambda c=compiled, x=x: jax.block_until_ready(c(params, x)), repeats)
        result = np.asarray(compiled(params, x))
        if op == "encode":  # the Flax VAE's posterior is channels-last
            result = np.transpose(result, (0, 3, 1, 2))
        np.save(out / f"flax_{op}{size}.npy", result)
        ops[f"{op}{size}"] = {"times": times, "compile": compile_time.seconds}
    return {"construct": construct.seconds, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description="Encode/decode speed: eqx_vae vs diffusers.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--skip", nargs="*", default=[], choices=IMPLEMENTATIONS)
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument(
        "--memory-size",
        type=int,
        default=512,
        help="decode size for the peak-memory measurement (0: skip)",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], pathlib.Path(args.memory_child[1]), args.memory_size)
        return
    if args.child:
        kind, folder, out = args.child
        child(kind, pathlib.Path(folder), args.sizes, args.repeats, pathlib.Path(out))
        return

    import jax

    import eqx_vae

    with tempfile.TemporaryDirectory() as tmp:
        folder, out = pathlib.Path(tmp) / "vae", pathlib.Path(tmp)
        model = eqx_vae.AutoencoderKL(eqx_vae.AutoencoderKLConfig.sd15(), key=jax.random.key(0))
        eqx_vae.save_diffusers(folder, model)
        del model
        results = {}
        kinds = [k for k in IMPLEMENTATIONS if k not in args.skip]
        for kind in kinds:
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            child_args = ["--child", kind, str(folder), str(out), "--repeats", str(args.repeats)]
            results[kind] = run_child(__file__, [*child_args, "--sizes", *map(str, args.sizes)])
            if args.memory_size:
                memory_args = [
                    "--memory-child",
                    kind,
                    str(folder),
                    "--memory-size",
                    str(args.memory_size),
                ]
                results[kind]["decode_peak_rss"] = run_child(__file__, memory_args)["peak_rss"]
        differences = _differences(out, kinds, args.sizes)
    report = _report(results, differences, args)
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "differences": differences}, indent=1)
        )


def _differences(out: pathlib.Path, kinds: list[str], sizes: list[int]) -> dict:
    """max |other - eqx_vae| / max |eqx_vae| for each output."""
    diffs: dict = {}
    for kind in kinds:
        if kind == "eqx_vae":
            continue
        for op, size in operations(sizes):
            ours = np.load(out / f"eqx_vae_{op}{size}.npy").astype(np.float64)
            theirs = np.load(out / f"{kind}_{op}{size}.npy").astype(np.float64)
            diffs.setdefault(kind, {})[f"{op}{size}"] = float(
                np.max(np.abs(theirs - ours)) / np.max(np.abs(ours))
            )
    return diffs


def _report(results: dict, differences: dict, args: argparse.Namespace) -> str:
    ours = results["eqx_vae"]
    ceiling = max(r.get("ceiling", 0.0) for r in results.values())
    keys = [f"{op}{size}" for op, size in operations(args.sizes)]
    names = {
        "eqx_vae": "eqx_vae",
        "torch": "diffusers torch NCHW",
        "torch_cl": "diffusers torch channels_last",
        "flax": "diffusers Flax",
    }
    rows = []
    for kind, r in results.items():
        row = [names[kind]]
        for key in keys:
            median = statistics.median(r["ops"][key]["times"])
            ratio = median / statistics.median(ours["ops"][key]["times"])
            rate = ours["flops"][key] / median / 1e9
            row.append(f"{median:.2f} s ({ratio:.2f}x, {rate:.0f} GF/s)")
        if "decode_peak_rss" in r:
            row.append(f"{r['decode_peak_rss']:.0f} MiB")
        row.append(f"{r['peak_rss']:.0f} MiB")
        row.append(f"{r['construct']:.2f} s")
        compiles = [r["ops"][k].get("compile") for k in keys if "compile" in r["ops"][k]]
        row.append(f"{sum(compiles):.1f} s" if compiles else "-")
        rows.append(row)
    memory = [f"peak RSS, decode {args.memory_size} alone"] if args.memory_size else []
    headers = [
        "implementation",
        *(k.replace("encode", "encode ").replace("decode", "decode ") + " px" for k in keys),
        *memory,
        "peak RSS, all runs",
        "construction",
        "compile (all ops)",
    ]
    lines = [
        f"Machine: {machine()}; {versions('jax', 'equinox', 'torch', 'diffusers', 'flax')}",
        f"float32, batch 1, median of {args.repeats} runs after a warm-up; times with the "
        "ratio to eqx_vae (above 1: slower than eqx_vae) and GFLOP/s from XLA's count of "
        f"the eqx_vae program; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s.",
        "",
        table(headers, rows),
        "",
        "Largest difference from eqx_vae's output, max|other - eqx_vae| / max|eqx_vae|:",
        "",
        table(
            ["implementation", *keys],
            [[names[k], *(f"{d[key]:.1e}" for key in keys)] for k, d in differences.items()],
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
