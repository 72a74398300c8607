"""Half precision against float32: the PSNR of bfloat16 and float16 decodes of an
SD-size VAE (random weights), and float16 on a model whose activations exceed its
range.

    python benchmarks/precision.py [--size 256]
"""

import argparse
import pathlib
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import machine, table, versions


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(10 * np.log10((b.max() - b.min()) ** 2 / np.mean((a - b) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Half precision against float32.")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_vae

    options = eqx_vae.compiler_options()
    config = eqx_vae.AutoencoderKLConfig.sd15().replace(force_upcast=False)
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, args.size // 8, args.size // 8))
    decode = eqx.filter_jit(lambda m, z, dtype: m.decode(z, dtype=dtype), compiler_options=options)  # pyright: ignore[reportCallIssue]
    reference = np.asarray(decode(model, z, None))
    rows = []
    for name, dtype, params in (
        ("bfloat16 compute, float32 parameters", jnp.bfloat16, model),
        ("bfloat16 compute and parameters", None, _cast(model, jnp.bfloat16)),
        ("float16 compute, float32 parameters", jnp.float16, model),
        ("float16 compute and parameters", None, _cast(model, jnp.float16)),
    ):
        out = np.asarray(decode(params, z, dtype))
        rows.append([name, f"{psnr(out, reference):.1f} dB", str(bool(np.isfinite(out).all()))])

    # Activations beyond float16's range, as in the SDXL VAE's decoder.
    scaled = eqx.tree_at(
        lambda m: m.decoder.conv_in.weight, model, model.decoder.conv_in.weight * 3e4
    )
    decoder = scaled.decoder
    hidden = decoder.up_blocks[0](decoder.mid_block(decoder.conv_in(z)))
    largest = float(jnp.max(jnp.abs(hidden)))
    reference = np.asarray(decode(scaled, z, None))
    # Plain float16 everywhere: the default policy computes in the input's dtype.
    plain = np.asarray(_cast(scaled, jnp.float16).decoder(z.astype(jnp.float16)))
    out = np.asarray(decode(scaled, z, jnp.float16))
    rows.append(
        [
            f"float16, activations up to {largest:.0f}: plain float16 everywhere",
            "-",
            str(bool(np.isfinite(plain).all())),
        ]
    )
    rows.append(
        [
            "... the same under eqx_vae's float16 policy",
            f"{psnr(out, reference):.1f} dB",
            str(bool(np.isfinite(out).all())),
        ]
    )
    print(f"Machine: {machine()}; {versions('jax', 'equinox')}")
    print(
        f"SD 1.x architecture, random weights, decode {args.size}x{args.size}, against float32:\n"
    )
    print(table(["precision", "PSNR", "finite"], rows))


def _cast(model, dtype):
    import jax

    return jax.tree_util.tree_map(lambda a: a.astype(dtype), model)


if __name__ == "__main__":
    main()
