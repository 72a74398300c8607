"""The train step: the adaptive weight, the discriminator's start, accumulation,
decoder-only training, EMA, gradient checkpointing and data parallelism."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require, small_config
from train_helpers import (
    assert_trees_close,
    batch_of_images,
    leaves,
    make_step,
    small_vae,
)

import eqx_vae
from eqx_vae import train


optax = require("optax")


@pytest.fixture(scope="module")
def vae():
    return small_vae()


@pytest.fixture(scope="module")
def images():
    return batch_of_images()


def _nll_and_g(vae, disc, logvar, images, keys):
    """The recipe's terms through the public API, for one batch."""

    def recon(x, k):
        return vae.decode(vae.encode(x).sample(k))

    rec = jax.vmap(recon)(images, keys)
    per_image = jax.vmap(train.nll_with_learned_logvar, (0, None))(train.l1(images, rec), logvar)
    return jnp.mean(per_image), train.generator_loss(jax.vmap(disc)(rec))


@pytest.mark.slow
def test_adaptive_weight_matches_direct_gradient_norms(vae, images):
    config = train.TrainConfig(disc_weight=0.5, disc_start=0, learning_rate=1e-3)
    optimizers, step = make_step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    assert state.disc is not None
    # A discriminator whose logits move enough for the weight to stay under its clip.
    disc = eqx.tree_at(lambda d: d.convs[-1].weight, state.disc, state.disc.convs[-1].weight * 10)
    state = eqx.tree_at(lambda s: s.disc, state, disc)
    key = jax.random.key(5)
    _, metrics = step(state, images, key)
    keys = jax.random.split(key, images.shape[0])

    @eqx.filter_jit
    def reference(vae, disc):
        def term(index):
            def f(model):
                return _nll_and_g(model, disc, state.logvar, images, keys)[index]

            return eqx.filter_grad(f)(vae).decoder.conv_out.weight

        nll, g = _nll_and_g(vae, disc, state.logvar, images, keys)
        kl = jnp.mean(jax.vmap(lambda x: vae.encode(x).kl())(images))
        return term(0), term(1), nll, g, kl

    nll_grad, g_grad, nll, g, kl = reference(vae, state.disc)
    expected = 0.5 * jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
    assert 1.0 < float(expected) < 0.5e4  # not clipped
    np.testing.assert_allclose(metrics["d_weight"], expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["g_loss"], g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], nll + 1e-6 * kl + float(expected) * g, rtol=1e-5)


@pytest.mark.slow
def test_discriminator_waits_for_disc_start(vae, images):
    config = train.TrainConfig(disc_weight=0.5, disc_start=2, learning_rate=1e-3)
    optimizers, step = make_step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    before = state.disc
    state, metrics = step(state, images, jax.random.key(6))
    assert float(metrics["d_loss"]) == 0.0
    assert_trees_close(state.disc, before, rtol=0)
    state, _ = step(state, images, jax.random.key(7))
    state, metrics = step(state, images, jax.random.key(8))  # step 2: the discriminator trains
    assert float(metrics["d_loss"]) > 0.0
    assert not np.allclose(leaves(state.disc)[0], leaves(before)[0])


@pytest.mark.slow
def test_accumulation_equals_one_batch(vae, images):
    results = []
    for parts in (1, 2):
        config = train.TrainConfig(disc_weight=0.0, learning_rate=1e-3, accumulate=parts)
        optimizers, step = make_step(config)
        state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
        results.append(step(state, images, jax.random.key(9)))
    (s1, m1), (s2, m2) = results
    # The gradients, in Adam's moments. Not the parameters after the step: Adam's first
    # update is about `lr * sign(g)`, which turns rounding in a gradient that is zero in
    # exact arithmetic (the attention keys' bias) into a full-size difference.
    assert_trees_close(s1.opt_vae, s2.opt_vae, whole_tree=True)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="micro-batches"):
        config = train.TrainConfig(accumulate=3)
        optimizers, step = make_step(config)
        step(
            train.init_state(vae, config, optimizers, key=jax.random.key(4)),
            images,
            jax.random.key(0),
        )


@pytest.mark.slow
def test_decoder_only_leaves_the_encoder_alone(vae, images):
    config = train.TrainConfig(disc_weight=0.0, learning_rate=1e-2, decoder_only=True)
    optimizers, step = make_step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    # The optimiser keeps no state for the frozen encoder.
    mu = state.opt_vae[0].mu[0]
    assert all(
        x is None for x in jax.tree_util.tree_leaves(mu.encoder, is_leaf=lambda x: x is None)
    )
    new, _ = step(state, images, jax.random.key(10))
    assert_trees_close(new.vae.encoder, vae.encoder, rtol=0)
    assert_trees_close(new.vae.quant_conv, vae.quant_conv, rtol=0)
    assert not np.allclose(new.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_trainable_leaves_out_flux2_statistics():
    vae = eqx_vae.AutoencoderKL(small_config(patch_size=(2, 2)), key=jax.random.key(0))
    for decoder_only in (False, True):
        spec, _ = train.trainable(vae, train.TrainConfig(decoder_only=decoder_only))
        assert not any(jax.tree_util.tree_leaves(spec.bn))
        assert all(jax.tree_util.tree_leaves(spec.decoder))


@pytest.mark.slow
def test_flux2_statistics_are_never_trained(images):
    """Not by the optimiser, not by its weight decay, not by the EMA: the statistics
    after training are the ones before, bit for bit, while the weights move."""
    vae = eqx_vae.AutoencoderKL(small_config(patch_size=(2, 2)), key=jax.random.key(0))
    stats = (jnp.linspace(-2.0, 2.0, 16), jnp.linspace(0.1, 3.0, 16), jnp.asarray(9, jnp.int32))
    vae = eqx.tree_at(
        lambda m: (m.bn.running_mean, m.bn.running_var, m.bn.num_batches_tracked), vae, stats
    )
    config = train.TrainConfig(disc_weight=0.0, learning_rate=1e-2, ema_decay=0.5)
    optimizers = (optax.adamw(1e-2, weight_decay=0.5), optax.adamw(1e-2, weight_decay=0.5))
    step = eqx.filter_jit(train.make_train_step(config, optimizers))
    state = train.init_state(vae, config, optimizers, key=jax.random.key(1))
    for i in range(2):
        state, _ = step(state, images, jax.random.key(2 + i))
    assert state.ema is not None
    for model in (state.vae, state.ema):
        assert model.bn is not None
        for after, before in zip(
            (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked),
            stats,
            strict=True,
        ):
            assert after.dtype == before.dtype
            np.testing.assert_array_equal(after, before)
    assert not np.allclose(state.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_weights(vae, images, warmup):
    config = train.TrainConfig(
        disc_weight=0.0, learning_rate=1e-2, ema_decay=0.9, ema_warmup=warmup
    )
    optimizers, step = make_step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    new, _ = step(state, images, jax.random.key(11))
    new2, _ = step(new, images, jax.random.key(12))
    # With the warm-up, step t uses min(0.9, (1 + t) / (10 + t)): 0.1, then 2/11.
    d1, d2 = (0.1, 2 / 11) if warmup else (0.9, 0.9)
    expected = jax.tree_util.tree_map(lambda e, v: d1 * e + (1 - d1) * v, vae, new.vae)
    assert_trees_close(new.ema, expected, rtol=1e-6)
    expected = jax.tree_util.tree_map(lambda e, v: d2 * e + (1 - d2) * v, new.ema, new2.vae)
    assert_trees_close(new2.ema, expected, rtol=1e-6)
    assert int(new2.step) == 2


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(vae):
    z = jax.random.normal(jax.random.key(12), (4, 8, 8))

    def loss(model, checkpoint):
        policy = eqx_vae.Policy(checkpoint=checkpoint)
        posterior = model.encode(model.decoder(z, policy=policy), policy=policy)
        return jnp.sum(jnp.square(posterior.mean)) + jnp.sum(jnp.square(posterior.logvar))

    grads = [
        eqx.filter_jit(eqx.filter_grad(loss))(vae, checkpoint) for checkpoint in (False, True)
    ]
    assert_trees_close(grads[1], grads[0], whole_tree=True)


@pytest.mark.slow
def test_gradient_checkpointing_lowers_compiled_memory(vae):
    # The compiled gradient keeps fewer bytes alive: the recomputation is not merged back
    # into the forward pass by the compiler.
    z = jax.random.normal(jax.random.key(12), (4, 32, 32))

    def loss(model, checkpoint):
        policy = eqx_vae.Policy(checkpoint=checkpoint)
        return jnp.sum(jnp.square(model.decoder(z, policy=policy)))

    temp = {}
    for checkpoint in (False, True):
        grad = eqx.filter_jit(eqx.filter_grad(loss))
        analysis = grad.lower(vae, checkpoint).compile().compiled.memory_analysis()  # pyright: ignore[reportFunctionMemberAccess]
        assert analysis is not None
        temp[checkpoint] = analysis.temp_size_in_bytes
    assert temp[True] < 0.6 * temp[False], temp


@pytest.mark.slow
def test_data_parallel_equals_one_device(vae, images):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    config = train.TrainConfig(disc_weight=0.5, disc_start=0, learning_rate=1e-3, ema_decay=0.9)
    optimizers, step = make_step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    single, m_single = step(state, images, jax.random.key(13))
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("batch",))
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    sharded_images = jax.device_put(images, NamedSharding(mesh, P("batch")))
    assert len(sharded_images.sharding.device_set) == 4
    parallel, m_parallel = step(replicated, sharded_images, jax.random.key(13))
    # The gradients (in Adam's moments) of both networks; the parameters themselves
    # moved by Adam's first, sign-like step, which amplifies rounding in tiny gradients.
    assert_trees_close(parallel.opt_vae, single.opt_vae, whole_tree=True)
    assert_trees_close(parallel.opt_disc, single.opt_disc, whole_tree=True)
    assert parallel.vae.decoder.conv_out.weight.sharding.is_fully_replicated
    for k in m_single:
        np.testing.assert_allclose(m_parallel[k], m_single[k], rtol=1e-5, atol=1e-6)
