"""Memory and time of one training step with and without gradient checkpointing
(`TrainConfig(checkpoint=True)`: block activations recomputed in the backward pass).

    python benchmarks/train_memory.py                          # built-in model, 4 x 256 px
    python benchmarks/train_memory.py --preset sd15 --size 128 --batch 1

Each setting runs in a fresh process; the table gives XLA's temporary buffer size for the
compiled step, the process's peak RSS, and the step time.
"""

import argparse
import json
import sys
import time

from _common import machine, peak_rss_mib, run_child, table


def child(args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax

    import eqx_vae
    from eqx_vae import train
    from eqx_vae._builtin import builtin_config

    config = (
        builtin_config()
        if args.preset == "builtin"
        else getattr(eqx_vae.AutoencoderKLConfig, args.preset)()
    )
    vae = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    tc = train.TrainConfig(
        disc_weight=0.5, disc_start=0, learning_rate=1e-4, checkpoint=args.checkpoint == "on"
    )
    optimizers = train.make_optimizers(tc)
    state = train.init_state(vae, tc, optimizers, key=jax.random.key(1))
    images = jax.random.uniform(
        jax.random.key(2), (args.batch, 3, args.size, args.size), minval=-1, maxval=1
    )
    step = eqx.filter_jit(  # pyright: ignore[reportCallIssue]
        train.make_train_step(tc, optimizers),
        donate="all",
        compiler_options=eqx_vae.compiler_options(),
    )
    compiled = step.lower(state, images, jax.random.key(3)).compile()  # pyright: ignore[reportAttributeAccessIssue]
    analysis = compiled.compiled.memory_analysis()
    temp = None if analysis is None else analysis.temp_size_in_bytes / 2**20
    state, metrics = step(state, images, jax.random.key(3))
    jax.block_until_ready(metrics)
    times = []
    for i in range(args.repeats):
        begun = time.perf_counter()
        state, metrics = step(state, images, jax.random.key(4 + i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begun)
    print(
        json.dumps(
            {
                "temp_mib": temp,
                "peak_rss_mib": peak_rss_mib(),
                "step_s": sorted(times)[len(times) // 2],
                "loss": float(metrics["loss"]),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--preset", default="builtin")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is not None:
        child(args)
        return
    common = ["--preset", args.preset, "--size", str(args.size), "--batch", str(args.batch)]
    common += ["--repeats", str(args.repeats)]
    results = {
        mode: run_child(__file__, [*common, "--checkpoint", mode]) for mode in ("off", "on")
    }
    print(f"{machine()}; {args.preset}, batch {args.batch} x {args.size} px, float32")
    rows = [
        [
            f"checkpoint {mode}",
            f"{r['temp_mib']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['step_s']:.2f}",
            f"{r['loss']:.6g}",
        ]
        for mode, r in results.items()
    ]
    print(table(["", "XLA temp MiB", "peak RSS MiB", "step s", "loss"], rows))
    off, on = results["off"], results["on"]
    print(
        f"checkpointing: temp x{on['temp_mib'] / off['temp_mib']:.2f}, "
        f"peak RSS x{on['peak_rss_mib'] / off['peak_rss_mib']:.2f}, "
        f"time x{on['step_s'] / off['step_s']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
