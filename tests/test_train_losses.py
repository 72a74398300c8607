"""The KL recipe's loss terms, the discriminator and LPIPS, against hand computations
and the reference implementations."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, require, require_torch, small_config

import eqx_vae
from eqx_vae import train


optax = require("optax")


def test_pixel_losses():
    x = jnp.array([0.5, -1.0, 0.25])
    y = jnp.array([0.0, 1.0, 0.25])
    np.testing.assert_allclose(train.l1(x, y), [0.5, 2.0, 0.0])
    np.testing.assert_allclose(train.l2(x, y), [0.25, 4.0, 0.0])


def test_nll_with_learned_logvar():
    error = jnp.arange(12, dtype=jnp.float32).reshape(3, 2, 2) / 10
    logvar = jnp.asarray(0.7)
    expected = sum(e / np.exp(0.7) + 0.7 for e in np.arange(12) / 10)
    np.testing.assert_allclose(train.nll_with_learned_logvar(error, logvar), expected, rtol=1e-6)


def test_discriminator_losses():
    real = jnp.array([[2.0, 0.5], [-1.0, 0.0]])
    fake = jnp.array([[-2.0, 0.5], [1.5, -0.5]])
    # hinge: relu(1 - real) = [0, .5, 2, 1] -> mean .875; relu(1 + fake) = [0, 1.5, 2.5, .5]
    # -> mean 1.125; half the sum is 1.0.
    np.testing.assert_allclose(train.hinge_d_loss(real, fake), 1.0, rtol=1e-6)
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected = 0.5 * (np.mean(softplus(-np.asarray(real))) + np.mean(softplus(np.asarray(fake))))
    np.testing.assert_allclose(train.vanilla_d_loss(real, fake), expected, rtol=1e-6)
    np.testing.assert_allclose(train.generator_loss(fake), -np.mean(np.asarray(fake)), rtol=1e-6)


def test_adaptive_weight_formula_and_clipping():
    a = jnp.array([3.0, 4.0])  # norm 5
    b = jnp.array([0.0, 2.0])  # norm 2
    np.testing.assert_allclose(train.adaptive_weight(a, b, 0.5), 0.5 * 5 / (2 + 1e-4), rtol=1e-6)
    assert float(train.adaptive_weight(a, jnp.zeros(2), 1.0)) == 1e4
    # No gradient flows through the weight.
    grad = jax.grad(lambda v: train.adaptive_weight(v, b, 1.0))(a)
    assert not np.any(np.asarray(grad))


@pytest.mark.torch
@pytest.mark.slow
def test_discriminator_against_torch():
    torch, _ = require_torch()
    import torch.nn.functional as F

    disc = train.PatchDiscriminator(3, channels=32, norm_num_groups=8, key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (3, 64, 64))
    out = disc(x)
    # 64 -> 32 -> 16 -> 8 (stride 2), then two 4x4 stride-1 convolutions with padding 1.
    assert out.shape == (1, 6, 6)
    with pytest.raises(ValueError, match="too small"):
        disc(x[:, :16, :16])
    t = torch.from_numpy(np.array(x))[None]
    convs = disc.convs
    for i, conv in enumerate(convs):
        weight = torch.from_numpy(np.array(conv.weight))
        bias = None if conv.bias is None else torch.from_numpy(np.array(conv.bias).reshape(-1))
        t = F.conv2d(t, weight, bias, stride=conv.stride, padding=1)
        if 0 < i < len(convs) - 1:
            norm = disc.norms[i - 1]
            t = F.group_norm(
                t,
                norm.groups,
                torch.from_numpy(np.array(norm.weight)),
                torch.from_numpy(np.array(norm.bias)),
                eps=norm.eps,
            )
        if i < len(convs) - 1:
            t = F.leaky_relu(t, 0.2)
    assert_close(out, t[0].numpy(), rtol=1e-5, what="discriminator")


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [False, True])
def test_reconstruction_gradients_match_diffusers(checkpoint):
    # The gradients that training follows, through every layer (the few-channel and
    # upsampling convolutions, attention, GroupNorm), against diffusers' autograd.
    torch, diffusers = require_torch()
    from eqx_vae._builtin import builtin_config

    config = builtin_config()
    vae = eqx_vae.AutoencoderKL(config, key=jax.random.key(5))
    theirs = diffusers.AutoencoderKL.from_config(config.to_dict())
    state = {
        k: torch.from_numpy(np.array(v)) for k, v in eqx_vae.to_diffusers_state_dict(vae).items()
    }
    theirs.load_state_dict(state, strict=True)
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)

    def loss(model):
        policy = eqx_vae.Policy(checkpoint=checkpoint)

        def one(image):
            posterior = model.encode(image, policy=policy)
            recon = model.decode(posterior.mean, policy=policy)
            return jnp.mean(jnp.abs(recon - image)), jnp.mean(posterior.logvar)

        errors, logvars = jax.vmap(one)(jnp.asarray(x))
        return jnp.mean(errors) + 1e-2 * jnp.mean(logvars)

    ours = eqx_vae.to_diffusers_state_dict(eqx.filter_jit(eqx.filter_grad(loss))(vae))
    xt = torch.from_numpy(x)
    moments = theirs.quant_conv(theirs.encoder(xt))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    recon = theirs.decoder(theirs.post_quant_conv(mean))
    ((recon - xt).abs().mean() + 1e-2 * logvar.mean()).backward()
    grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    assert grads.keys() == ours.keys()
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for name, want in grads.items():
        # Per tensor within 1e-4 of its largest gradient; tensors whose gradient is zero
        # in exact arithmetic (the attention keys' bias) within 1e-5 of the model's.
        tolerance = max(1e-4 * float(np.abs(want).max()), 1e-5 * scale)
        assert np.abs(ours[name] - want).max() <= tolerance, name


def test_loss_area_weighs_every_pixel_alike_across_crop_sizes(getkey):
    """`TrainConfig(loss_area=...)`: the loss, and so its gradients, times
    `loss_area / (height * width)`; unchanged at that area; the metrics unscaled."""
    vae = eqx_vae.AutoencoderKL(small_config(), key=getkey())
    images = jax.random.uniform(getkey(), (2, 3, 32, 32), minval=-1.0, maxval=1.0)
    keys = jax.random.split(getkey(), 2)
    logvar = jnp.asarray(0.3)

    def value_and_grad(config):
        def loss(model):
            return train.autoencoder_loss(model, logvar, images, keys, config)

        return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(vae)

    (plain, (metrics, _)), plain_grads = value_and_grad(train.TrainConfig())
    (same, _), _ = value_and_grad(train.TrainConfig(loss_area=32 * 32))
    (quarter, (scaled_metrics, _)), grads = value_and_grad(train.TrainConfig(loss_area=16 * 16))
    np.testing.assert_allclose(same, plain, rtol=1e-6)
    np.testing.assert_allclose(quarter, plain / 4, rtol=1e-6)
    # Each gradient tensor within 1e-5 of its largest element (two compiled programs).
    leaves = jax.tree_util.tree_leaves
    for g, p in zip(leaves(grads), leaves(plain_grads), strict=True):
        np.testing.assert_allclose(g, p / 4, rtol=0, atol=1e-5 * float(np.abs(p / 4).max()))
    for name in ("nll", "kl"):
        np.testing.assert_allclose(scaled_metrics[name], metrics[name], rtol=1e-6)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_colour_weight_adds_the_error_of_block_means(kind, getkey):
    """`TrainConfig(colour_weight=w, colour_block=b)`: the NLL's per-pixel error gains
    `w` times the error of the `b` by `b` block means on each block's pixels (none past
    the last whole block), against a hand computation in NumPy."""
    images = np.asarray(jax.random.uniform(getkey(), (2, 3, 20, 12), minval=-1.0, maxval=1.0))
    recon = np.asarray(jax.random.uniform(getkey(), (2, 3, 20, 12), minval=-1.0, maxval=1.0))
    logvar = jnp.asarray(0.4)
    distance = np.abs if kind == "l1" else np.square
    means = lambda x: x[..., :16, :8].reshape(2, 3, 2, 8, 1, 8).mean(axis=(3, 5))  # noqa: E731
    colour = np.zeros_like(images)
    colour[..., :16, :8] = np.kron(distance(means(images) - means(recon)), np.ones((8, 8)))
    per_pixel = distance(images - recon) + 2.5 * colour
    expected = np.mean(np.sum(per_pixel / np.exp(0.4) + 0.4, axis=(1, 2, 3)))
    config = train.TrainConfig(reconstruction=kind, colour_weight=2.5, colour_block=8)
    ours = train.reconstruction_loss(jnp.asarray(images), jnp.asarray(recon), logvar, config)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # A difference that is constant over each block counts 1 + colour_weight times.
    shifted = images + np.float32(0.1)
    plain = train.TrainConfig(reconstruction=kind)
    base = train.reconstruction_loss(jnp.asarray(images), jnp.asarray(shifted), logvar, plain)
    weighted = train.reconstruction_loss(
        jnp.asarray(images[..., :16, :8]), jnp.asarray(shifted[..., :16, :8]), logvar, config
    )
    base_area = train.reconstruction_loss(
        jnp.asarray(images[..., :16, :8]), jnp.asarray(shifted[..., :16, :8]), logvar, plain
    )
    offset = 3 * 16 * 8 * 0.4
    np.testing.assert_allclose(weighted - offset, 3.5 * (base_area - offset), rtol=1e-4)
    assert float(base) > float(base_area)


def test_config_rejects_nonsense(without_typechecks):
    with pytest.raises(ValueError, match="reconstruction"):
        train.TrainConfig(reconstruction="l3")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="accumulate"):
        train.TrainConfig(accumulate=0)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="loss_area"):
        train.TrainConfig(loss_area=0)
    with pytest.raises(ValueError, match="colour_block"):
        train.TrainConfig(colour_weight=1.0, colour_block=0)
    with pytest.raises(ValueError, match="colour_weight"):
        train.TrainConfig(colour_weight=-1.0)
    config = train.TrainConfig(ema_decay=0.99, betas=(0.9, 0.99))
    assert train.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_lpips_parity_with_the_lpips_package():
    """Against the `lpips` package's output on random VGG16 trunk weights and its own
    linear heads (the fixture made by `tests/make_lpips_fixture.py`)."""
    from helpers import FIXTURES
    from make_lpips_fixture import trunk_state_dict

    fixture = np.load(FIXTURES / "lpips_vgg.npz")
    metric = train.LPIPS.from_state_dicts(trunk_state_dict(), train.LPIPS.shipped_heads())
    x, y = jnp.asarray(fixture["x"]), jnp.asarray(fixture["y"])
    ours = eqx.filter_jit(lambda m, a, b: jax.vmap(m)(a, b))(metric, x, y)
    np.testing.assert_allclose(ours, fixture["distance"], rtol=1e-5, atol=1e-7)
    features = eqx.filter_jit(lambda m, a: m.features(a))(metric, x[0])
    for i, f in enumerate(features):
        np.testing.assert_allclose(f, fixture[f"features_{i}"], rtol=1e-5, atol=1e-5)
