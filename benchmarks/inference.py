"""Encode and decode an SD-size VAE: eqx_vae against diffusers (PyTorch, NCHW and
channels-last) and diffusers' Flax VAE, on the same weights and inputs.

    pip install -e ".[bench]"
    python benchmarks/inference.py [--repeats 3] [--sizes 256 512] [--skip flax]

eqx_vae runs the way README recommends (`eqx_vae.compile`), and, as `eqx_vae plain`,
the way a user of Equinox writes it without knowing of compiler options
(`eqx.filter_jit(jax.vmap(model.decode))`). Batch throughput (images per second at
`--batch` images of `--batch-size` pixels, one timed run after a warm-up) is measured
for every implementation too.

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


IMPLEMENTATIONS = ("eqx_vae", "eqx_vae_plain", "torch", "torch_cl", "flax")


def operations(sizes: list[int], batch: int = 0, batch_size: int = 0) -> list[tuple]:
    """`(op, size, batch)` of every measured operation: batch 1 at each size, then
    batch `batch` at `batch_size` (when `batch` > 1)."""
    ops = [(op, size, 1) for size in sizes for op in ("encode", "decode")]
    if batch > 1:
        ops += [(op, batch_size, batch) for op in ("encode", "decode")]
    return ops


def key(op: str, size: int, batch: int) -> str:
    return f"{op}{size}" if batch == 1 else f"{op}{size}x{batch}"


def inputs(op: str, size: int, batch: int = 1) -> np.ndarray:
    """The same images in [-1, 1] or latents for every implementation, NCHW."""
    rng = np.random.default_rng(size + (0 if op == "encode" else 1) + 1000 * (batch - 1))
    if op == "encode":
        return rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    return rng.standard_normal((batch, 4, size // 8, size // 8)).astype(np.float32)


def timed_repeats(batch: int, repeats: int) -> int:
    """Batches are timed once after the warm-up (they take several times longer)."""
    return repeats if batch == 1 else 1


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
        import eqx_vae

        model = eqx_vae.load_diffusers(folder)
        decode = eqx_vae.compile(model, "decode", (size, size), batch=1)
        decode(latent).block_until_ready()
    elif kind == "eqx_vae_plain":
        import equinox as eqx
        import jax

        import eqx_vae

        model = eqx_vae.load_diffusers(folder)
        decode = eqx.filter_jit(lambda m, z: jax.vmap(m.decode)(z))
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
    kind: str, folder: pathlib.Path, ops: list[tuple], repeats: int, out: pathlib.Path
) -> None:
    result: dict = {"kind": kind, "ops": {}}
    if kind.startswith("eqx_vae"):
        result.update(_eqx_child(folder, ops, repeats, out, plain=kind == "eqx_vae_plain"))
    elif kind.startswith("torch"):
        result.update(_torch_child(folder, ops, repeats, out, channels_last=kind == "torch_cl"))
    else:
        result.update(_flax_child(folder, ops, repeats, out))
    result["peak_rss"] = peak_rss_mib()
    print(json.dumps(result))


def _eqx_child(folder, ops, repeats, out, plain: bool) -> dict:
    """eqx_vae as README recommends (`eqx_vae.compile`), or, with `plain`, through a
    plain `eqx.filter_jit` of `jax.vmap(model.encode)`."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_vae

    jnp.zeros(1).block_until_ready()
    config = eqx_vae.AutoencoderKLConfig.sd15()
    with Timer() as construct:
        jax.block_until_ready(eqx_vae.AutoencoderKL(config, key=jax.random.key(1)))
    model = eqx_vae.load_diffusers(folder)
    plain_fns = {
        "encode": eqx.filter_jit(lambda m, x: jax.vmap(m.encode)(x).mean),
        "decode": eqx.filter_jit(lambda m, z: jax.vmap(m.decode)(z)),
    }
    results, flops = {}, {}
    for op, size, batch in ops:
        x = jnp.asarray(inputs(op, size, batch))
        name = key(op, size, batch)
        if plain:
            fn = plain_fns[op]
            with Timer() as compile_time:
                fn(model, x).block_until_ready()  # jit compiles on the first call
            run = lambda fn=fn, x=x: jax.block_until_ready(fn(model, x))  # noqa: E731
        else:
            with Timer() as compile_time:
                program = eqx_vae.compile(model, op, (size, size), batch=batch)
            cost = program.executable.cost_analysis() or {}
            cost = cost[0] if isinstance(cost, list) else cost
            flops[name] = float(cost.get("flops", float("nan")))
            if op == "encode":
                run = lambda p=program, x=x: p(x).mean.block_until_ready()  # noqa: E731
            else:
                run = lambda p=program, x=x: p(x).block_until_ready()  # noqa: E731
        times = time_runs(run, timed_repeats(batch, repeats))
        np.save(out / f"{'eqx_vae_plain' if plain else 'eqx_vae'}_{name}.npy", np.asarray(run()))
        results[name] = {"times": times, "compile": compile_time.seconds}
    return {
        "construct": construct.seconds,
        "ops": results,
        "flops": flops,
        "ceiling": _jax_ceiling(eqx_vae.compiler_options()),
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


def _torch_child(folder, ops, repeats, out, channels_last: bool) -> dict:
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
    results = {}
    for op, size, batch in ops:
        x = torch.from_numpy(inputs(op, size, batch)).to(memory_format=layout)

        def run(x=x, op=op):
            with torch.no_grad():
                if op == "encode":
                    return model.encode(x).latent_dist.mean  # pyright: ignore
                return model.decode(x).sample  # pyright: ignore

        name = key(op, size, batch)
        times = time_runs(run, timed_repeats(batch, repeats))
        np.save(out / f"{'torch_cl' if channels_last else 'torch'}_{name}.npy", run().numpy())
        results[name] = {"times": times}
    return {"construct": construct.seconds, "ops": results, "ceiling": _torch_ceiling()}


def _torch_ceiling() -> float:
    import torch

    best = 0.0
    for n in (2048, 4096):
        a = torch.ones((n, n))
        seconds = min(time_runs(lambda a=a: a @ a, 3))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def _flax_child(folder, ops, repeats, out) -> dict:
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
    results = {}
    for op, size, batch in ops:
        x = jnp.asarray(inputs(op, size, batch))
        with Timer() as compile_time:
            compiled = jax.jit(fns[op]).lower(params, x).compile()
        times = time_runs(
            lambda c=compiled, x=x: jax.block_until_ready(c(params, x)),
            timed_repeats(batch, repeats),
        )
        result = np.asarray(compiled(params, x))
        if op == "encode":  # the Flax VAE's posterior is channels-last
            result = np.transpose(result, (0, 3, 1, 2))
        name = key(op, size, batch)
        np.save(out / f"flax_{name}.npy", result)
        results[name] = {"times": times, "compile": compile_time.seconds}
    return {"construct": construct.seconds, "ops": results}


def main() -> None:
    parser = argparse.ArgumentParser(description="Encode/decode speed: eqx_vae vs diffusers.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4, help="batch for throughput (0: skip)")
    parser.add_argument("--batch-size", type=int, default=512, help="image size of the batch")
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
    ops = operations(args.sizes, args.batch, args.batch_size)
    if args.memory_child:
        memory_child(args.memory_child[0], pathlib.Path(args.memory_child[1]), args.memory_size)
        return
    if args.child:
        kind, folder, out = args.child
        child(kind, pathlib.Path(folder), ops, args.repeats, pathlib.Path(out))
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
        common = ["--repeats", str(args.repeats), "--batch", str(args.batch)]
        common += ["--batch-size", str(args.batch_size), "--sizes", *map(str, args.sizes)]
        for kind in kinds:
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            results[kind] = run_child(__file__, ["--child", kind, str(folder), str(out), *common])
            if args.memory_size:
                memory_args = ["--memory-child", kind, str(folder)]
                memory_args += ["--memory-size", str(args.memory_size)]
                results[kind]["decode_peak_rss"] = run_child(__file__, memory_args)["peak_rss"]
        differences = _differences(out, kinds, ops)
    report = _report(results, differences, ops, args)
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps({"results": results, "differences": differences}, indent=1)
        )


def _differences(out: pathlib.Path, kinds: list[str], ops: list[tuple]) -> dict:
    """max |other - eqx_vae| / max |eqx_vae| for each output."""
    diffs: dict = {}
    for kind in kinds:
        if kind == "eqx_vae":
            continue
        for op in ops:
            name = key(*op)
            ours = np.load(out / f"eqx_vae_{name}.npy").astype(np.float64)
            theirs = np.load(out / f"{kind}_{name}.npy").astype(np.float64)
            diffs.setdefault(kind, {})[name] = float(
                np.max(np.abs(theirs - ours)) / np.max(np.abs(ours))
            )
    return diffs


NAMES = {
    "eqx_vae": "eqx_vae (`eqx_vae.compile`, README's path)",
    "eqx_vae_plain": "eqx_vae, plain `eqx.filter_jit`",
    "torch": "diffusers torch NCHW",
    "torch_cl": "diffusers torch channels_last",
    "flax": "diffusers Flax",
}


def _report(results: dict, differences: dict, ops: list[tuple], args) -> str:
    ours = results["eqx_vae"]
    ceiling = max(r.get("ceiling", 0.0) for r in results.values())
    single = [key(*op) for op in ops if op[2] == 1]
    batched = [op for op in ops if op[2] > 1]
    rows = []
    for kind, r in results.items():
        row = [NAMES[kind]]
        for name in single:
            median = statistics.median(r["ops"][name]["times"])
            ratio = median / statistics.median(ours["ops"][name]["times"])
            rate = ours["flops"][name] / median / 1e9
            row.append(f"{median:.2f} s ({ratio:.2f}x, {rate:.0f} GF/s)")
        if "decode_peak_rss" in r:
            row.append(f"{r['decode_peak_rss']:.0f} MiB")
        row.append(f"{r['peak_rss']:.0f} MiB")
        row.append(f"{r['construct']:.2f} s")
        compiles = [r["ops"][k].get("compile") for k in single if "compile" in r["ops"][k]]
        row.append(f"{sum(compiles):.1f} s" if compiles else "-")
        rows.append(row)
    memory = [f"peak RSS, decode {args.memory_size} alone"] if args.memory_size else []
    headers = [
        "implementation",
        *(k.replace("encode", "encode ").replace("decode", "decode ") + " px" for k in single),
        *memory,
        "peak RSS, all runs",
        "construction",
        "compile (batch 1 ops)",
    ]
    lines = [
        f"Machine: {machine()}; {versions('jax', 'equinox', 'torch', 'diffusers', 'flax')}",
        f"float32, batch 1, median of {args.repeats} runs after a warm-up; times with the "
        "ratio to eqx_vae (above 1: slower than eqx_vae) and GFLOP/s from XLA's count of "
        f"the eqx_vae program; measured float32 matmul ceiling {ceiling:.0f} GFLOP/s.",
        "",
        table(headers, rows),
    ]
    if batched:
        lines += [
            "",
            f"Throughput at batch {batched[0][2]}, {batched[0][1]} px (one timed run after a "
            "warm-up), images per second, with the ratio of eqx_vae's to each:",
            "",
            table(
                ["implementation", *(f"{op} images/s" for op, _, _ in batched)],
                [
                    [NAMES[kind], *(_throughput(r, ours, op) for op in batched)]
                    for kind, r in results.items()
                ],
            ),
        ]
    keys = [key(*op) for op in ops]
    lines += [
        "",
        "Largest difference from eqx_vae's output, max|other - eqx_vae| / max|eqx_vae|:",
        "",
        table(
            ["implementation", *keys],
            [[NAMES[k], *(f"{d[name]:.1e}" for name in keys)] for k, d in differences.items()],
        ),
    ]
    return "\n".join(lines)


def _throughput(r: dict, ours: dict, op: tuple) -> str:
    name = key(*op)
    rate = op[2] / statistics.median(r["ops"][name]["times"])
    our_rate = op[2] / statistics.median(ours["ops"][name]["times"])
    return f"{rate:.3f} ({our_rate / rate:.2f}x)"


if __name__ == "__main__":
    main()
