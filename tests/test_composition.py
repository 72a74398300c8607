"""The design card's user: a small latent denoiser of their own, written with
`eqx.Module` from eqx_vae's public blocks, with the autoencoder held frozen as a field,
trained with `eqx.filter_value_and_grad` and optax, checkpointed with
`eqx.tree_serialise_leaves` and restored into an `eqx.filter_eval_shape` skeleton."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, require, small_config

import eqx_vae


optax = require("optax")


class Denoiser(eqx.Module):
    """Predicts the noise added to a scaled latent."""

    vae: eqx_vae.AutoencoderKL
    conv_in: eqx.nn.Conv2d
    resnet: eqx_vae.ResnetBlock2D
    down: eqx_vae.DownEncoderBlock2D
    mid: eqx_vae.MidBlock2D
    up: eqx_vae.UpDecoderBlock2D
    conv_out: eqx.nn.Conv2d

    def __init__(self, vae: eqx_vae.AutoencoderKL, width: int, *, key):
        keys = jax.random.split(key, 6)
        c = vae.latent_channels
        self.vae = vae
        self.conv_in = eqx.nn.Conv2d(c, width, 3, padding=1, key=keys[0])
        self.resnet = eqx_vae.ResnetBlock2D(width, width, 8, key=keys[1])
        self.down = eqx_vae.DownEncoderBlock2D(width, 2 * width, 1, 8, key=keys[2])
        self.mid = eqx_vae.MidBlock2D(2 * width, 8, key=keys[3])
        self.up = eqx_vae.UpDecoderBlock2D(2 * width, width, 1, 8, key=keys[4])
        self.conv_out = eqx.nn.Conv2d(width, c, 3, padding=1, key=keys[5])

    def __call__(self, z, *, policy=None):
        h = self.resnet(self.conv_in(z), policy=policy)
        h = self.up(self.mid(self.down(h, policy=policy), policy=policy), policy=policy)
        return self.conv_out(h.astype(z.dtype))

    def loss(self, images, key, policy=None):
        k_sample, k_noise = jax.random.split(key)
        posterior = jax.vmap(self.vae.encode)(images)
        keys = jax.random.split(k_sample, len(images))
        z = self.vae.scale_latents(jax.vmap(lambda p, k: p.sample(k))(posterior, keys))
        noise = jax.random.normal(k_noise, z.shape)
        predicted = jax.vmap(lambda v: self(v, policy=policy))(z + noise)
        return jnp.mean(jnp.square(predicted - noise))


@pytest.fixture(scope="module")
def vae():
    return eqx_vae.AutoencoderKL(small_config(force_upcast=False), key=jax.random.key(0))


def _frozen(model):
    """Train everything but the autoencoder."""
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    return eqx.tree_at(
        lambda m: m.vae, spec, replace_fn=lambda v: jax.tree_util.tree_map(lambda _: False, v)
    )


@pytest.mark.slow
def test_a_denoiser_of_ones_own(vae, tmp_path):
    model = Denoiser(vae, 16, key=jax.random.key(1))
    images = jax.random.uniform(jax.random.key(2), (4, 3, 16, 16), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.key(3), (4, 8, 8))

    # Half precision through the public policy: finite, float32 between layers, close to
    # float32.
    full = model(z)
    for dtype in (jnp.bfloat16, jnp.float16):
        half = eqx.filter_jit(model)(z, policy=eqx_vae.Policy(dtype=dtype))
        assert half.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(half)))
        assert_close(half, full, rtol=5e-2, what=str(dtype))

    # A few steps of training with the autoencoder frozen.
    optimizer = optax.adam(2e-3)
    spec = _frozen(model)
    opt_state = optimizer.init(eqx.filter(model, spec))

    @eqx.filter_jit
    def step(model, opt_state, key):
        trainable, frozen = eqx.partition(model, spec)

        def loss(trainable):
            return eqx.combine(trainable, frozen).loss(images, key)

        value, grads = eqx.filter_value_and_grad(loss)(trainable)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return eqx.apply_updates(model, updates), opt_state, value

    losses = []
    for _ in range(12):
        model, opt_state, value = step(model, opt_state, jax.random.key(0))
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0], losses
    for before, after in zip(
        jax.tree_util.tree_leaves(vae), jax.tree_util.tree_leaves(model.vae), strict=True
    ):
        np.testing.assert_array_equal(before, after)

    # Checkpointed, and restored into a skeleton that holds no arrays.
    path = tmp_path / "denoiser.eqx"
    eqx.tree_serialise_leaves(path, model)
    skeleton = eqx.filter_eval_shape(Denoiser, vae, 16, key=jax.random.key(1))
    restored = eqx.tree_deserialise_leaves(path, skeleton)
    for a, b in zip(
        jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(restored), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored(z), model(z))
