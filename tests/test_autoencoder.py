import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

import eqx_vae
from eqx_vae import AutoencoderKLConfig


@pytest.mark.parametrize(
    "config, encode",
    [
        (small_config(scaling_factor=0.18215), lambda z: z * 0.18215),
        (
            small_config(scaling_factor=1.5305, shift_factor=0.0609),
            lambda z: (z - 0.0609) * 1.5305,
        ),
        (
            small_config(
                scaling_factor=0.5,
                latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
                latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
            ),
            lambda z: (
                (z - np.array([-1.6574, 1.886, -1.383, 2.5155])[:, None, None])
                * 0.5
                / np.array([8.4927, 5.9022, 6.5498, 5.2299])[:, None, None]
            ),
        ),
    ],
    ids=["sd", "sd3", "playground"],
)
def test_latent_scaling_conventions(config, encode, getkey):
    model = eqx_vae.AutoencoderKL(config, key=getkey())
    z = jax.random.normal(getkey(), (4, 3, 5)) * 5
    scaled = model.scale_latents(z)
    np.testing.assert_allclose(scaled, encode(np.asarray(z, np.float64)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(scaled), z, rtol=1e-5, atol=1e-5)
    # Elementwise, so a batch works too.
    batch = jnp.stack([z, 2 * z])
    np.testing.assert_allclose(
        model.scale_latents(batch)[1], model.scale_latents(2 * z), rtol=1e-6
    )


def test_presets_build_abstractly_with_expected_size():
    import equinox as eqx

    counts = {}
    for preset in eqx_vae.PRESETS:
        config = getattr(AutoencoderKLConfig, preset)()
        skeleton = eqx.filter_eval_shape(
            eqx_vae.AutoencoderKL.from_config, config, key=jax.random.key(0)
        )
        counts[preset] = sum(
            int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(skeleton)
        )
    assert counts["sd15"] == 83_653_863  # diffusers' SD VAE parameter count
    assert counts["sd15"] == counts["sdxl"] == counts["sd2"] == counts["playground25"]
    assert counts["sd3"] == counts["flux1"]


@pytest.mark.slow
def test_reconstruction_shapes_for_non_square_inputs(getkey):
    model = eqx_vae.AutoencoderKL(
        small_config(in_channels=4, out_channels=2, latent_channels=16), key=getkey()
    )
    x = jax.random.uniform(getkey(), (4, 8, 14), minval=-1, maxval=1)
    posterior = model.encode(x)
    assert posterior.mean.shape == (16, 4, 7)
    assert model.decode(posterior.mode()).shape == (2, 8, 14)
    assert model(x).shape == (2, 8, 14)
    assert model.spatial_factor == 2 and model.in_channels == 4 and model.out_channels == 2


def _arrays(tree):
    import equinox as eqx

    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


def _assert_identical(a, b):
    la, lb = _arrays(a), _arrays(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_same_key_same_parameters_eagerly_jitted_and_abstractly():
    import equinox as eqx

    config = small_config(block_out_channels=(16, 32, 32), norm_num_groups=8)
    key = jax.random.key(7)
    eager = eqx_vae.AutoencoderKL(config, key=key)
    _assert_identical(eager, eqx_vae.AutoencoderKL(config, key=key))
    jitted = eqx.filter_jit(lambda k: eqx_vae.AutoencoderKL(config, key=k))(key)
    _assert_identical(eager, jitted)
    skeleton = eqx.filter_eval_shape(eqx_vae.AutoencoderKL, config, key=key)
    shapes = [(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(skeleton)]
    assert shapes == [(leaf.shape, leaf.dtype) for leaf in _arrays(eager)]
    # A parameter dtype is the float32 draw, rounded.
    half = eqx_vae.AutoencoderKL(config, jnp.bfloat16, key=key)
    _assert_identical(half, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), eager))
    other = eqx_vae.AutoencoderKL(config, key=jax.random.key(8))
    assert not np.array_equal(other.decoder.conv_out.weight, eager.decoder.conv_out.weight)


def test_submodules_built_alone_equal_the_models():
    config = small_config(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=2)
    key = jax.random.key(3)
    model = eqx_vae.AutoencoderKL(config, key=key)
    k_enc, k_dec, _, _ = jax.random.split(key, 4)
    encoder = eqx_vae.Encoder(3, 4, (16, 32), 2, 8, key=k_enc)
    _assert_identical(encoder, model.encoder)
    _assert_identical(eqx_vae.Decoder(4, 3, (16, 32), 2, 8, key=k_dec), model.decoder)
    # Down to a single block: the encoder gives its first level the fourth of its keys,
    # and the level gives its first ResNet block the first of its own.
    k_level = jax.random.split(k_enc, 2 + 3)[3]
    k_resnet = jax.random.split(k_level, 2 + 1)[0]
    resnet = eqx_vae.ResnetBlock2D(16, 16, 8, key=k_resnet)
    _assert_identical(resnet, model.encoder.down_blocks[0].resnets[0])
