"""Inference at every scale: attention in blocks, tiles with shared GroupNorm
statistics, one image sharded over devices, mixed precision, batches in chunks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, small_config

import eqx_vae


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    peak = b.max() - b.min()
    return float(10 * np.log10(peak**2 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def model():
    config = small_config(block_out_channels=(32, 32, 32), norm_num_groups=8, layers_per_block=1)
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def test_attention_in_query_blocks_equals_whole(model):
    attention = model.decoder.mid_block.attentions[0]
    x = jax.random.normal(jax.random.key(1), (32, 12, 10))
    whole = attention(x)
    # 120 keys * 4 bytes * 7 queries per block: 18 blocks, the last one padded.
    policy = eqx_vae.Policy(attention_block_bytes=120 * 4 * 7)
    blocked = eqx.filter_jit(attention)(x, policy=policy)
    assert_close(blocked, whole, rtol=1e-6)


# Sharding: one image, its height split over 4 or 8 of the conftest's CPU devices.


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 8])
def test_sharded_decode_equals_single_device(model, devices):
    mesh = jax.make_mesh((devices,), ("rows",), devices=jax.devices()[:devices])
    z = jax.random.normal(jax.random.key(1), (4, 16, 12))
    out = eqx.filter_jit(eqx_vae.sharded_decode)(model, z, mesh, "rows")
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "rows", None))
    assert out.sharding.is_equivalent_to(rows, out.ndim)
    assert len(out.sharding.device_set) == devices
    assert_close(out, model.decode(z), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 8])
def test_sharded_encode_equals_single_device(model, devices):
    mesh = jax.make_mesh((devices,), ("rows",), devices=jax.devices()[:devices])
    x = jax.random.uniform(jax.random.key(2), (3, 64, 24), minval=-1, maxval=1)
    posterior = eqx.filter_jit(eqx_vae.sharded_encode)(model, x, mesh, "rows")
    expected = model.encode(x)
    assert_close(posterior.mean, expected.mean, rtol=1e-5)
    assert_close(posterior.logvar, expected.logvar, rtol=1e-5)


def test_sharded_requires_divisible_height(model, without_typechecks):
    mesh = jax.make_mesh((8,), ("rows",))
    with pytest.raises(
        ValueError, match=r"latent height 12 cannot be split evenly over 8 devices"
    ):
        eqx_vae.sharded_decode(model, jnp.zeros((4, 12, 8)), mesh, "rows")
    with pytest.raises(ValueError, match=r"in multiples of 4 rows; pad it to a multiple of 32"):
        eqx_vae.sharded_encode(model, jnp.zeros((3, 48, 8)), mesh, "rows")
    with pytest.raises(ValueError, match=r"`axis_name='cols'` is not an axis"):
        eqx_vae.sharded_decode(model, jnp.zeros((4, 16, 8)), mesh, "cols")


# Tiles.


@pytest.mark.slow
def test_single_tile_is_exact(model):
    z = jax.random.normal(jax.random.key(1), (4, 12, 10))
    out = eqx.filter_jit(eqx_vae.tiled_decode)(model, z, tile_size=64)
    assert_close(out, model.decode(z), rtol=1e-5)
    x = jax.random.uniform(jax.random.key(2), (3, 48, 40), minval=-1, maxval=1)
    posterior = eqx.filter_jit(eqx_vae.tiled_encode)(model, x, tile_size=64)
    assert_close(posterior.mean, model.encode(x).mean, rtol=1e-5)


def _latent(heterogeneous: bool):
    # Not a multiple of the tile in either direction, and not square.
    z = jax.random.normal(jax.random.key(3), (4, 44, 60))
    if heterogeneous:  # bright on the left, dark on the right: tiles differ in content
        z = 0.5 * z + jnp.where(jnp.arange(60)[None, None, :] < 30, 2.0, -2.0)
    return z


@pytest.mark.slow
@pytest.mark.parametrize("heterogeneous", [False, True])
def test_tiled_decode_equals_whole(model, heterogeneous):
    z = _latent(heterogeneous)
    reference = eqx.filter_jit(model.decode)(z)
    decode = eqx.filter_jit(eqx_vae.tiled_decode)
    tiled = decode(model, z, tile_size=32)
    assert tiled.shape == reference.shape == (3, 176, 240)
    assert_close(tiled, reference, rtol=1e-5)
    # Per-tile statistics, as in diffusers' tiling, shift the tiles' tone.
    per_tile = decode(model, z, tile_size=32, exact_statistics=False)
    assert psnr(per_tile, reference) < (25 if heterogeneous else 45)


@pytest.mark.slow
def test_tiled_encode_equals_whole(model):
    x = jax.random.uniform(jax.random.key(4), (3, 176, 240), minval=-1, maxval=1)
    expected = eqx.filter_jit(model.encode)(x)
    posterior = eqx.filter_jit(eqx_vae.tiled_encode)(model, x, tile_size=48)
    assert posterior.mean.shape == (4, 44, 60)
    assert_close(posterior.mean, expected.mean, rtol=1e-5)
    assert_close(posterior.logvar, expected.logvar, rtol=1e-5)


@pytest.mark.slow
def test_tiling_under_checkpointing_and_its_gradients(model):
    """The statistics reach every tile's GroupNorms as plain inputs, so that the
    recomputation in the backward pass sees them too: the tiled decode under
    checkpointing, and its gradient, equal the whole decode's."""
    z = jax.random.normal(jax.random.key(6), (4, 12, 10))
    policy = eqx_vae.Policy(checkpoint=True)

    def loss(m, tiled):
        if tiled:
            image = eqx_vae.tiled_decode(m, z, tile_size=16, policy=policy)
        else:
            image = m.decode(z, policy=policy)
        return jnp.sum(jnp.square(image)), image

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (_, tiled), tiled_grads = grad(model, True)
    (_, whole), whole_grads = grad(model, False)
    assert_close(tiled, whole, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves(eqx.filter(whole_grads, eqx.is_array))
    scale = max(float(jnp.max(jnp.abs(g))) for g in leaves)
    for got, want in zip(
        jax.tree_util.tree_leaves(eqx.filter(tiled_grads, eqx.is_array)), leaves, strict=True
    ):
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * scale


@pytest.mark.slow
def test_tiling_without_quant_convs_or_attention():
    config = small_config(
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False
    )
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, 30, 20))
    out = eqx.filter_jit(eqx_vae.tiled_decode)(model, z, tile_size=16)
    assert_close(out, model.decode(z), rtol=1e-5)


def test_tiling_a_one_level_model():
    config = small_config(block_out_channels=(16,), norm_num_groups=8)
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (4, 20, 20))
    assert_close(eqx_vae.tiled_decode(model, z, tile_size=8), model.decode(z), rtol=1e-5)


def test_tiling_argument_errors(model, without_typechecks):
    with pytest.raises(ValueError, match=r"`tile_size=7` must be a multiple of 2"):
        eqx_vae.tiled_decode(model, jnp.zeros((4, 20, 20)), tile_size=7)


# Precision.


@pytest.mark.slow
def test_bfloat16_compute_against_float32(model):
    z = jax.random.normal(jax.random.key(1), (4, 16, 16))
    full = model.decode(z)
    half = model.decode(z, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32  # activations between layers stay float32
    assert psnr(half, full) > 30


def _overflowing_model(force_upcast: bool) -> eqx_vae.AutoencoderKL:
    """A model whose decoder activations exceed float16's largest value, 65504."""
    config = small_config(force_upcast=force_upcast)
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    return eqx.tree_at(
        lambda m: m.decoder.conv_in.weight, model, model.decoder.conv_in.weight * 3e5
    )


@pytest.mark.slow
def test_float16_with_overflowing_activations_stays_finite():
    model = _overflowing_model(force_upcast=False)
    z = jax.random.normal(jax.random.key(1), (4, 8, 8))
    hidden = model.decoder.mid_block(model.decoder.conv_in(z))
    assert float(jnp.max(jnp.abs(hidden))) > 65504  # would overflow in float16
    # Plain float16 everywhere (the default policy computes in the input's dtype)
    # overflows to infinities and NaNs.
    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), model)
    plain = half.decoder(z.astype(jnp.float16))
    assert not bool(jnp.all(jnp.isfinite(plain)))
    out = model.decode(z, dtype=jnp.float16)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert psnr(out, model.decode(z)) > 25


def test_force_upcast_computes_float16_requests_in_float32():
    model = _overflowing_model(force_upcast=True)
    z = jax.random.normal(jax.random.key(1), (4, 8, 8))
    assert model.resolve_policy(dtype=jnp.float16).dtype == jnp.float32
    np.testing.assert_array_equal(model.decode(z, dtype=jnp.float16), model.decode(z))
    assert model.resolve_policy(dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_compute_dtype_must_be_floating(model):
    with pytest.raises(ValueError, match="must be floating point"):
        model.resolve_policy(dtype=jnp.int32)


# Batches.


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_batch_sharded_over_a_mesh(model, axis_type):
    # jax.make_mesh gives explicit axes by default: every reshape then needs a sharding
    # rule, which exists for splitting or merging one axis at a time only.
    kind = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
    mesh = jax.make_mesh(
        (4,), ("batch",), axis_types=(kind[axis_type],), devices=jax.devices()[:4]
    )
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    x = jax.random.uniform(jax.random.key(6), (4, 3, 16, 16), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.key(7), (4, 4, 4, 4))
    encode = eqx.filter_jit(lambda m, x: jax.vmap(m.encode)(x).mean)
    decode = eqx.filter_jit(lambda m, z: jax.vmap(m.decode)(z))
    means = encode(model, jax.device_put(x, batch))
    images = decode(model, jax.device_put(z, batch))
    assert images.sharding.is_equivalent_to(batch, images.ndim)
    assert_close(means, jax.vmap(model.encode)(x).mean, rtol=1e-5)
    assert_close(images, jax.vmap(model.decode)(z), rtol=1e-5)


@pytest.mark.slow
def test_batches_in_chunks_equal_vmap(model):
    latents = jax.random.normal(jax.random.key(5), (6, 4, 8, 8))
    chunked = jax.lax.map(model.decode, latents, batch_size=4)
    assert_close(chunked, jax.vmap(model.decode)(latents), rtol=1e-5)


@pytest.mark.slow
def test_compiler_options():
    options = eqx_vae.compiler_options()
    assert isinstance(options, dict)
    if jax.default_backend() == "cpu":
        # jaxlib 0.8.1 and later know the option; earlier ones get none.
        assert options in ({"xla_cpu_experimental_ynn_fusion_type": ""}, {})
        known = tuple(int(p) for p in jax.__version__.split(".")[:3]) >= (0, 8, 1)
        assert bool(options) == known
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    z = jnp.zeros((4, 4, 4))
    fast = eqx.filter_jit(model.decode, compiler_options=options)  # pyright: ignore[reportCallIssue]
    assert_close(fast(z), model.decode(z), rtol=1e-5)
