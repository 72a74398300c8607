"""Latent statistics of a dataset and the latent conventions derived from them."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require, small_config

import eqx_vae


def _images(key, shape):
    return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(small_config(latent_channels=3), key=jax.random.key(0))


def _known_posterior(model, mean, std):
    """`model` with a posterior that ignores the image: N(mean, std^2) per channel."""
    quant = model.quant_conv
    bias = jnp.concatenate([jnp.asarray(mean), 2 * jnp.log(jnp.asarray(std))])
    return eqx.tree_at(
        lambda m: (m.quant_conv.weight, m.quant_conv.bias),
        model,
        (jnp.zeros_like(quant.weight), bias.reshape(quant.bias.shape).astype(quant.bias.dtype)),
    )


def test_a_known_latent_distribution_is_estimated(model):
    mean, std = np.array([0.5, -1.0, 2.0]), np.array([0.5, 2.0, 1.0])
    known = _known_posterior(model, mean, std)
    images = [_images(jax.random.key(i), (4, 3, 16, 16)) for i in range(4)]
    stats = eqx_vae.latent_statistics(known, images, key=jax.random.key(7))
    assert stats.images == 16 and stats.count == 16 * 8 * 8  # spatial factor 2
    # 1024 independent draws a channel: standard errors std/32 and about std/45.
    np.testing.assert_allclose(stats.mean, mean, atol=float(4 * std.max() / 32))
    np.testing.assert_allclose(stats.std, std, rtol=4 / 45)
    mixture_var = np.mean(std**2) + np.var(mean)
    np.testing.assert_allclose(stats.global_mean, mean.mean(), atol=0.2)
    np.testing.assert_allclose(stats.global_std, np.sqrt(mixture_var), rtol=0.1)
    # Without a key, the posterior's mode: exactly the means, no spread.
    modes = eqx_vae.latent_statistics(known, images)
    np.testing.assert_allclose(modes.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(modes.std, 0.0, atol=1e-6)


def test_statistics_are_those_of_all_the_latents(model):
    batches = [_images(jax.random.key(i), (2, 3, 16, 24)) for i in range(2)]
    batches.append(_images(jax.random.key(9), (2, 3, 8, 8)))  # another size
    stats = eqx_vae.latent_statistics(model, batches)
    latents = np.concatenate(
        [
            np.asarray(jax.vmap(lambda x: model.encode(x).mode())(b), np.float64)
            .transpose(1, 0, 2, 3)
            .reshape(3, -1)
            for b in batches
        ],
        axis=1,
    )
    np.testing.assert_allclose(stats.mean, latents.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, latents.std(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.global_mean, latents.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.global_std, latents.std(), rtol=1e-5)
    assert stats.count == latents.shape[1] and stats.images == 6


def test_streaming_equals_one_batch(model):
    images = _images(jax.random.key(3), (6, 3, 16, 16))
    whole = eqx_vae.latent_statistics(model, images)  # one array: one batch
    for sizes in ((1, 1, 1, 1, 1, 1), (2, 4), (5, 1)):
        starts = np.cumsum((0, *sizes))
        streamed = eqx_vae.latent_statistics(
            model, (images[a:b] for a, b in itertools.pairwise(starts))
        )
        np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(streamed.std, whole.std, rtol=1e-5)
        np.testing.assert_allclose(streamed.global_std, whole.global_std, rtol=1e-5)
        assert streamed.count == whole.count


@pytest.fixture(scope="module")
def photographs():
    """Crops of scikit-image's sample photographs, on which the built-in model was
    trained, 64 px as it was trained; the built-in model, its latents of the crops and
    their statistics."""
    skimage_data = require("skimage.data")
    crops = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field"):
        image = np.asarray(getattr(skimage_data, name)())[..., :3].astype(np.float32)
        image = image.transpose(2, 0, 1) / 127.5 - 1.0
        _, h, w = image.shape
        for top in range(0, h - 63, h // 4):
            for left in range(0, w - 63, w // 4):
                crops.append(image[:, top : top + 64, left : left + 64])
    crops = np.stack(crops)
    builtin = eqx_vae.load_builtin()
    stats = eqx_vae.latent_statistics(builtin, np.array_split(crops, 6))
    latents = eqx.filter_jit(jax.vmap(lambda x: builtin.encode(x).mode()))(jnp.asarray(crops))
    return builtin, latents, stats


@pytest.mark.parametrize("convention", ["scaling", "shift_scaling", "per_channel"])
def test_derived_factors_give_unit_standard_deviation(photographs, convention):
    builtin, latents, stats = photographs

    def scaled(model):
        z = np.asarray(model.scale_latents(latents), np.float64)
        return z.transpose(1, 0, 2, 3).reshape(model.latent_channels, -1)

    scaled_model = eqx_vae.apply_latent_statistics(builtin, stats, convention)
    # The parameters are the same; only the config's latent convention changed.
    leaves = jax.tree_util.tree_leaves(builtin), jax.tree_util.tree_leaves(scaled_model)
    for a, b in zip(*leaves, strict=True):
        assert a is b
    z = scaled(scaled_model)
    if convention == "per_channel":
        np.testing.assert_allclose(z.std(axis=1), 1.0, rtol=0.02)
        np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=0.02)
        assert scaled_model.config.latents_mean == tuple(stats.mean)
    else:
        np.testing.assert_allclose(z.std(), 1.0, rtol=0.02)
    if convention == "shift_scaling":
        np.testing.assert_allclose(z.mean(), 0.0, atol=0.02)
        assert scaled_model.config.shift_factor == stats.global_mean
    # Playground v2.5 keeps its per-channel latents at standard deviation 0.5.
    half = eqx_vae.apply_latent_statistics(builtin, stats, convention, target_std=0.5)
    np.testing.assert_allclose(scaled(half).std(), 0.5, rtol=0.02)


def test_the_default_convention_is_the_models_own(model):
    stats = eqx_vae.latent_statistics(model, _images(jax.random.key(1), (2, 3, 16, 16)))
    assert eqx_vae.apply_latent_statistics(model, stats).config.shift_factor is None
    flux_like = eqx_vae.apply_latent_statistics(model, stats, "shift_scaling")
    again = eqx_vae.apply_latent_statistics(flux_like, stats)
    assert again.config.shift_factor == stats.global_mean
    per_channel = eqx_vae.apply_latent_statistics(model, stats, "per_channel")
    assert eqx_vae.apply_latent_statistics(per_channel, stats).config.latents_std == tuple(
        stats.std
    )


def test_statistics_errors(model, without_typechecks):
    stats = eqx_vae.latent_statistics(model, _images(jax.random.key(1), (1, 3, 16, 16)))
    with pytest.raises(ValueError, match="no batches"):
        eqx_vae.latent_statistics(model, [])
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        eqx_vae.latent_statistics(model, [np.zeros((3, 16, 16), np.float32)])
    with pytest.raises(ValueError, match="convention"):
        eqx_vae.apply_latent_statistics(model, stats, "bogus")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="target_std"):
        eqx_vae.apply_latent_statistics(model, stats, target_std=0.0)
    other = eqx_vae.AutoencoderKL(small_config(latent_channels=4), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"3 latent channels \(patch None\); the model has 4"):
        eqx_vae.apply_latent_statistics(other, stats)


def test_flux2_statistics_are_its_batch_norm_statistics():
    config = small_config(
        block_out_channels=(16, 32), norm_num_groups=8, patch_size=(2, 2), latent_channels=3
    )
    flux2 = eqx_vae.AutoencoderKL(config, key=jax.random.key(2))
    images = _images(jax.random.key(5), (4, 3, 16, 24))
    stats = eqx_vae.latent_statistics(flux2, [images[:2], images[2:]])
    assert stats.patch == (2, 2) and stats.mean.shape == (12,)  # 4 * latent_channels
    assert stats.conventions() == ("batch_norm",)
    normalised = eqx_vae.apply_latent_statistics(flux2, stats)  # FLUX.2's own convention
    assert normalised.bn is not None and normalised.config == flux2.config
    np.testing.assert_allclose(normalised.bn.running_mean, stats.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(normalised.bn.running_var, stats.std**2, rtol=1e-6)
    # What the diffusion model sees, patchified and normalised: mean 0, std 1 per channel
    # (std / sqrt(std**2 + eps) exactly).
    z = jax.vmap(lambda x: normalised.scale_latents(normalised.encode(x).mode()))(images)
    z = np.asarray(z, np.float64).transpose(1, 0, 2, 3).reshape(12, -1)
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-4)
    eps = flux2.config.batch_norm_eps
    np.testing.assert_allclose(z.std(axis=1), stats.std / np.sqrt(stats.std**2 + eps), rtol=1e-4)
    with pytest.raises(ValueError, match="patchified latent"):
        eqx_vae.apply_latent_statistics(flux2, stats, "scaling")
    with pytest.raises(ValueError, match="standard deviation 1"):
        eqx_vae.apply_latent_statistics(flux2, stats, target_std=0.5)
    restored = eqx_vae.LatentStatistics.from_dict(stats.to_dict())
    assert restored.patch == (2, 2)
    np.testing.assert_array_equal(restored.mean, stats.mean)
