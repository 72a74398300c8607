"""Compiled programs (`eqx_vae.compile`) and images of any size through a few of them
(`eqx_vae.Codec`): the same results as the model's own `encode`/`decode`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, small_config

import eqx_vae


@pytest.fixture(scope="module")
def model():
    # Three levels (spatial factor 4) with the mid-block attention: the padding of a
    # bucket must stay out of convolutions, GroupNorm statistics and attention keys.
    config = small_config(block_out_channels=(16, 32, 32))
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def jitted(model, method):
    """`eqx.filter_jit` of the model's own method under the same compiler options."""
    return eqx.filter_jit(  # pyright: ignore[reportCallIssue]
        lambda m, x: getattr(m, method)(x), compiler_options=eqx_vae.compiler_options()
    )


def host_pixels(image) -> np.ndarray:
    """The conversion `eqx-vae` applies when it writes an image file."""
    pixels = np.clip((np.asarray(image, np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return np.moveaxis(pixels.astype(np.uint8), -3, -1)


def test_compiled_decode_equals_the_models_own(model):
    z = jax.random.normal(jax.random.key(1), (4, 8, 12))
    decode = eqx_vae.compile(model, "decode", (32, 48))
    assert decode.input.shape == (4, 8, 12)
    out = decode(z)
    # The same computation under the same options: bit-equal.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jitted(model, "decode")(model, z)))
    # Eagerly, XLA's default CPU convolutions round differently.
    assert_close(out, model.decode(z), rtol=1e-5)


def test_compiled_batched_encode_equals_vmap(model):
    x = jax.random.uniform(jax.random.key(2), (3, 3, 32, 16), minval=-1, maxval=1)
    encode = eqx_vae.compile(model, "encode", (32, 16), batch=3)
    posterior = encode(x)
    expected = eqx.filter_jit(  # pyright: ignore[reportCallIssue]
        jax.vmap(lambda m, x: m.encode(x), in_axes=(None, 0)),
        compiler_options=eqx_vae.compiler_options(),
    )(model, x)
    assert isinstance(posterior, eqx_vae.DiagonalGaussian)
    assert posterior.mean.shape == (3, 4, 8, 4)
    assert_close(posterior.mean, expected.mean, rtol=1e-6)
    assert_close(posterior.logvar, expected.logvar, rtol=1e-6)


def test_pixels_out_equal_the_host_conversion(model):
    z = 2.0 * jax.random.normal(jax.random.key(3), (2, 4, 8, 8))  # some pixels clip
    floats = eqx_vae.compile(model, "decode", (32, 32), batch=2)(z)
    pixels = eqx_vae.compile(model, "decode", (32, 32), batch=2, pixels=True)(z)
    assert pixels.dtype == jnp.uint8 and pixels.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(pixels), host_pixels(floats))


def test_pixels_in(model):
    pixels = jax.random.randint(jax.random.key(4), (16, 24, 3), 0, 256).astype(jnp.uint8)
    posterior = eqx_vae.compile(model, "encode", (16, 24), pixels=True)(pixels)
    image = jnp.transpose(pixels.astype(jnp.float32) / 127.5 - 1.0, (2, 0, 1))
    expected = jitted(model, "encode")(model, image)
    assert_close(posterior.mean, expected.mean, rtol=1e-6)


def test_half_precision_program(model):
    z = jax.random.normal(jax.random.key(5), (4, 8, 8))
    out = eqx_vae.compile(model, "decode", (32, 32), dtype=jnp.bfloat16)(z)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert_close(out, model.decode(z, dtype=jnp.bfloat16), rtol=2e-2)


def test_compile_errors(model, without_typechecks):
    decode = eqx_vae.compile(model, "decode", (16, 16))
    with pytest.raises(ValueError, match=r"compiled for inputs of shape \(4, 4, 4\)"):
        decode(jnp.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="multiple of the model's spatial factor 4"):
        eqx_vae.compile(model, "decode", (18, 16))
    with pytest.raises(ValueError, match="'encode' or 'decode'"):
        eqx_vae.compile(model, "reconstruct", (16, 16))  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`batch`"):
        eqx_vae.compile(model, "decode", (16, 16), batch=0)


# Codec: sizes that are not multiples of the spatial factor (edge-padded, as the
# command line does), in a bucket, at a bucket's edge and beyond the last bucket.
SIZES = [(24, 40), (50, 33), (100, 20)]


def test_codec_equals_the_image_alone(model):
    codec = eqx_vae.Codec(model, buckets=(32, 64))
    encode, decode = jitted(model, "encode"), jitted(model, "decode")
    f = model.spatial_factor
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        image = rng.uniform(-1, 1, (3, h, w)).astype(np.float32)
        padded = np.pad(image, ((0, 0), (0, -h % f), (0, -w % f)), mode="edge")
        expected = encode(model, jnp.asarray(padded))
        posterior = codec.encode(image)
        assert_close(posterior.mean, expected.mean, rtol=1e-5, what=f"mean {h}x{w}")
        assert_close(posterior.logvar, expected.logvar, rtol=1e-5, what=f"logvar {h}x{w}")
        z = expected.mode()
        image_out = codec.decode(z)
        assert_close(image_out, decode(model, z), rtol=1e-5, what=f"decode {h}x{w}")
        np.testing.assert_array_equal(
            np.asarray(codec.decode(z, pixels=True)), host_pixels(image_out)
        )
    # 32 x 64, 64 x 64, and 128 x 32 beyond the last edge: each compiled once per
    # method and output, and another size in a bucket already seen compiles nothing.
    buckets = {p.size for p in codec.programs}
    assert buckets == {(32, 64), (64, 64), (128, 32)}, buckets
    assert len(codec.programs) == 3 * len(buckets)
    assert codec.reconstruct(np.zeros((3, 60, 61), np.float32)).shape == (3, 60, 61)
    assert len(codec.programs) == 3 * len(buckets)


def test_codec_batches(model):
    codec = eqx_vae.Codec(model, buckets=(32, 64))
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 20, 28)).astype(np.float32)
    batched = codec.reconstruct(images)
    assert batched.shape == (2, 3, 20, 28)
    for image, out in zip(images, batched, strict=True):
        assert_close(out, codec.reconstruct(image), rtol=1e-5)


def test_codec_without_buckets_compiles_per_shape(model):
    codec = eqx_vae.Codec(model, buckets=None)
    assert codec.bucket(50, 33) == (52, 36)
    z = jax.random.normal(jax.random.key(6), (4, 5, 7))
    assert_close(codec.decode(z), jitted(model, "decode")(model, z), rtol=1e-6)


def test_codec_errors(model):
    with pytest.raises(ValueError, match="increasing positive multiples of 4"):
        eqx_vae.Codec(model, buckets=(64, 30))
    codec = eqx_vae.Codec(model)
    with pytest.raises(ValueError, match=r"\(3, height, width\)"):
        codec.encode(np.zeros((16, 16, 3), np.float32))
