"""The first call of a fresh process, without and with JAX's persistent compilation
cache: the time from process start to the first decoded (or encoded) image of an
SD-size VAE, through `eqx_vae.compile`.

    python benchmarks/compile_cache.py [--size 512] [--method decode]

After a first process that is not counted (it reads the libraries from disk), three
fresh processes run one after the other: without a cache, with an empty cache (which
it fills), and with the filled cache. Each reports the time from its start to
the end of its first call, the compilation time, and how many programs JAX found in
the cache.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import Literal


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import Timer, machine, run_child, table, versions


def child(method: Literal["encode", "decode"], size: int) -> None:
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import eqx_vae

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
    )
    model = jax.eval_shape(
        lambda: eqx_vae.AutoencoderKL(eqx_vae.AutoencoderKLConfig.sd15(), key=jax.random.key(0))
    )
    # Zero weights are enough to time: the program does not depend on their values.
    model = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model)
    imported = time.perf_counter() - start
    program = eqx_vae.compile(model, method, (size, size), batch=1)
    x = np.zeros(program.input.shape, np.float32)
    jax.block_until_ready(program(x))
    print(
        json.dumps(
            {
                "import_and_model": imported,
                "compile": program.compile_seconds,
                "cache_hits": len(hits),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--method", choices=("encode", "decode"), default="decode")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.method, args.size)
        return
    child_args = ["--child", "--size", str(args.size), "--method", args.method]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        # A first process, not counted, reads the libraries from disk into the page cache.
        run_child(__file__, child_args, env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
        runs = [
            ("no cache", {"JAX_ENABLE_COMPILATION_CACHE": "false"}),
            ("empty cache (filled by this run)", {"JAX_COMPILATION_CACHE_DIR": cache}),
            ("filled cache", {"JAX_COMPILATION_CACHE_DIR": cache}),
        ]
        for name, env in runs:
            env = {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
            if "JAX_COMPILATION_CACHE_DIR" not in env:
                env["JAX_COMPILATION_CACHE_DIR"] = ""
            with Timer() as wall:
                r = run_child(__file__, child_args, env=env)
            rows.append(
                [
                    name,
                    f"{wall.seconds:.1f} s",
                    f"{r['compile']:.1f} s",
                    f"{r['import_and_model']:.1f} s",
                    r["cache_hits"],
                ]
            )
    print(f"Machine: {machine()}; {versions('jax', 'equinox')}")
    print(f"SD-size VAE, {args.method} at {args.size} px, batch 1, float32, a fresh process each:")
    print()
    headers = ["run", "start to first result", "compile", "import + model", "cache hits"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
