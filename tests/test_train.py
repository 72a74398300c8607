"""`eqx_vae.train`: loss terms, the train step, data, checkpoints and resuming."""

import itertools
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


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def _assert_trees_close(a, b, rtol=1e-5, whole_tree=False):
    """Every leaf within `rtol` of the other's largest magnitude (the parity tolerance's
    form), or with `whole_tree` of the largest magnitude in the whole tree (for
    gradients, where some leaves are zero up to rounding: the biases that a GroupNorm
    follows); `rtol=0` asks for equality."""
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    scale = max(float(np.max(np.abs(y))) for y in lb if y.size)
    for x, y in zip(la, lb, strict=True):
        if rtol == 0:
            np.testing.assert_array_equal(x, y)
        elif whole_tree:
            assert float(np.max(np.abs(x - y), initial=0.0)) <= rtol * scale
        else:
            assert_close(x, y, rtol=rtol)


@pytest.fixture(scope="module")
def vae():
    return eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))


@pytest.fixture(scope="module")
def images():
    # 32 px: the least the discriminator's three stride-2 layers take.
    return jax.random.uniform(jax.random.key(1), (4, 3, 32, 32), minval=-1.0, maxval=1.0)


# --- loss terms against hand computations ---


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


def test_config_rejects_nonsense(without_typechecks):
    with pytest.raises(ValueError, match="reconstruction"):
        train.TrainConfig(reconstruction="l3")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="accumulate"):
        train.TrainConfig(accumulate=0)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.5)
    config = train.TrainConfig(ema_decay=0.99, betas=(0.9, 0.99))
    assert train.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- the train step ---


def _step(config, lpips=None):
    optimizers = train.make_optimizers(config)
    return optimizers, eqx.filter_jit(train.make_train_step(config, optimizers, lpips))


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
    optimizers, step = _step(config)
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
    optimizers, step = _step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    before = state.disc
    state, metrics = step(state, images, jax.random.key(6))
    assert float(metrics["d_loss"]) == 0.0
    _assert_trees_close(state.disc, before, rtol=0)
    state, _ = step(state, images, jax.random.key(7))
    state, metrics = step(state, images, jax.random.key(8))  # step 2: the discriminator trains
    assert float(metrics["d_loss"]) > 0.0
    assert not np.allclose(_leaves(state.disc)[0], _leaves(before)[0])


@pytest.mark.slow
def test_accumulation_equals_one_batch(vae, images):
    results = []
    for parts in (1, 2):
        config = train.TrainConfig(disc_weight=0.0, learning_rate=1e-3, accumulate=parts)
        optimizers, step = _step(config)
        state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
        results.append(step(state, images, jax.random.key(9)))
    (s1, m1), (s2, m2) = results
    # The gradients, in Adam's moments. Not the parameters after the step: Adam's first
    # update is about `lr * sign(g)`, which turns rounding in a gradient that is zero in
    # exact arithmetic (the attention keys' bias) into a full-size difference.
    _assert_trees_close(s1.opt_vae, s2.opt_vae, whole_tree=True)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="micro-batches"):
        config = train.TrainConfig(accumulate=3)
        optimizers, step = _step(config)
        step(
            train.init_state(vae, config, optimizers, key=jax.random.key(4)),
            images,
            jax.random.key(0),
        )


@pytest.mark.slow
def test_decoder_only_leaves_the_encoder_alone(vae, images):
    config = train.TrainConfig(disc_weight=0.0, learning_rate=1e-2, decoder_only=True)
    optimizers, step = _step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    # The optimiser keeps no state for the frozen encoder.
    mu = state.opt_vae[0].mu[0]
    assert all(
        x is None for x in jax.tree_util.tree_leaves(mu.encoder, is_leaf=lambda x: x is None)
    )
    new, _ = step(state, images, jax.random.key(10))
    _assert_trees_close(new.vae.encoder, vae.encoder, rtol=0)
    _assert_trees_close(new.vae.quant_conv, vae.quant_conv, rtol=0)
    assert not np.allclose(new.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_weights(vae, images, warmup):
    config = train.TrainConfig(
        disc_weight=0.0, learning_rate=1e-2, ema_decay=0.9, ema_warmup=warmup
    )
    optimizers, step = _step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    new, _ = step(state, images, jax.random.key(11))
    new2, _ = step(new, images, jax.random.key(12))
    # With the warm-up, step t uses min(0.9, (1 + t) / (10 + t)): 0.1, then 2/11.
    d1, d2 = (0.1, 2 / 11) if warmup else (0.9, 0.9)
    expected = jax.tree_util.tree_map(lambda e, v: d1 * e + (1 - d1) * v, vae, new.vae)
    _assert_trees_close(new.ema, expected, rtol=1e-6)
    expected = jax.tree_util.tree_map(lambda e, v: d2 * e + (1 - d2) * v, new.ema, new2.vae)
    _assert_trees_close(new2.ema, expected, rtol=1e-6)
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
    _assert_trees_close(grads[1], grads[0], whole_tree=True)


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
    optimizers, step = _step(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    single, m_single = step(state, images, jax.random.key(13))
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("batch",))
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    sharded_images = jax.device_put(images, NamedSharding(mesh, P("batch")))
    assert len(sharded_images.sharding.device_set) == 4
    parallel, m_parallel = step(replicated, sharded_images, jax.random.key(13))
    # The gradients (in Adam's moments) of both networks; the parameters themselves
    # moved by Adam's first, sign-like step, which amplifies rounding in tiny gradients.
    _assert_trees_close(parallel.opt_vae, single.opt_vae, whole_tree=True)
    _assert_trees_close(parallel.opt_disc, single.opt_disc, whole_tree=True)
    assert parallel.vae.decoder.conv_out.weight.sharding.is_fully_replicated
    for k in m_single:
        np.testing.assert_allclose(m_parallel[k], m_single[k], rtol=1e-5, atol=1e-6)


# --- data, checkpoints, fit ---


def _image_folder(tmp_path, count=5):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        y, x = np.mgrid[0:40, 0:48]
        base = 127 + 100 * np.sin(x / (3 + i) + y / 5)
        rgb = np.stack([base, base[::-1], np.full_like(base, 40 * i)], axis=-1)
        rgb = rgb + rng.normal(0, 5, rgb.shape)
        sub = folder / "nested" if i % 2 else folder
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(sub / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_folder_is_deterministic(tmp_path):
    folder = _image_folder(tmp_path)
    a = train.ImageFolder(folder, crop_size=16, batch_size=3, seed=1)
    b = train.ImageFolder(folder, crop_size=16, batch_size=3, seed=1)
    assert len(a.files) == 5
    position = train.DataPosition()
    batches = []
    for _ in range(4):  # crosses an epoch boundary
        batch, position = a.batch(position)
        assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
        assert batch.min() >= -1.0 and batch.max() <= 1.0
        batches.append(batch)
    assert position == train.DataPosition(epoch=2, index=2)
    streamed = [x for x, _ in zip(b.batches(), range(4), strict=False)]
    for (x, _), y in zip(streamed, batches, strict=True):
        np.testing.assert_array_equal(x, y)
    # Resuming from a position gives the batch that followed it.
    later, _ = b.batch(train.DataPosition(epoch=1, index=1))
    np.testing.assert_array_equal(later, batches[2])
    other = train.ImageFolder(folder, crop_size=16, batch_size=3, seed=2)
    assert not np.array_equal(other.batch(train.DataPosition())[0], batches[0])


def test_image_folder_augmentations(tmp_path):
    folder = _image_folder(tmp_path)
    plain = train.ImageFolder(folder, crop_size=16, batch_size=5, seed=4)
    permuted = train.ImageFolder(folder, crop_size=16, batch_size=5, seed=4, permute_channels=True)
    x, _ = plain.batch(train.DataPosition())
    y, _ = permuted.batch(train.DataPosition())
    # The same crops, each with its channels in some order, not always the identity.
    changed = 0
    for a, b in zip(x, y, strict=True):
        orders = [o for o in itertools.permutations(range(3)) if np.array_equal(a[list(o)], b)]
        assert orders, "a permuted crop is not a channel permutation of the crop"
        changed += (0, 1, 2) not in orders
    assert changed > 0

    # scale=0.5: a region twice the crop's side, shrunk with antialiasing.
    halved = train.ImageFolder(folder, crop_size=16, batch_size=4, seed=4, scale=(0.5, 0.5))
    image = halved._image(halved.files[halved._order(0)[0]])
    crop = halved.sample(0, 0)
    assert crop.shape == (3, 16, 16) and crop.min() >= -1 and crop.max() <= 1
    best = min(
        float(np.abs(crop - candidate).mean())
        for top in range(image.shape[1] - 31)
        for left in range(image.shape[2] - 31)
        for region in [image[:, top : top + 32, left : left + 32]]
        for candidate in (
            region.reshape(3, 16, 2, 16, 2).mean(axis=(2, 4)),
            region[:, :, ::-1].reshape(3, 16, 2, 16, 2).mean(axis=(2, 4)),
        )
    )
    assert best < 0.05  # close to a 2x2 box average of some 32-pixel region
    ranged = train.ImageFolder(folder, crop_size=16, batch_size=4, seed=4, scale=(0.5, 1.0))
    batch, _ = ranged.batch(train.DataPosition())
    assert batch.shape == (4, 3, 16, 16)
    again, _ = ranged.batch(train.DataPosition())
    np.testing.assert_array_equal(batch, again)
    with pytest.raises(ValueError, match="scale range"):
        train.ImageFolder(folder, crop_size=16, batch_size=1, scale=(1.0, 0.5))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train.ImageFolder(tmp_path / "missing", crop_size=8, batch_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train.ImageFolder(tmp_path / "empty", crop_size=8, batch_size=1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    data = train.ImageFolder(tmp_path / "broken", crop_size=8, batch_size=1)
    with pytest.raises(ValueError, match="Cannot read the image"):
        next(data.batches())


def _fit(tmp_path, vae, steps, out, **kwargs):
    config = train.TrainConfig(
        disc_weight=0.5, disc_start=2, learning_rate=2e-3, betas=(0.9, 0.99), ema_decay=0.9
    )
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    data = train.ImageFolder(_image_folder(tmp_path), crop_size=32, batch_size=2, seed=3)
    return train.fit(
        state,
        config,
        data,
        optimizers,
        steps=steps,
        out=out,
        key=jax.random.key(14),
        log_every=1,
        progress=False,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, vae):
    whole = _fit(tmp_path, vae, 4, tmp_path / "whole")
    _fit(tmp_path, vae, 2, tmp_path / "split")
    resumed = _fit(tmp_path, vae, 4, tmp_path / "split")
    assert int(resumed.step) == 4
    _assert_trees_close(resumed, whole, rtol=1e-5)
    read = lambda name: [  # noqa: E731
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    whole_log, split_log = read("whole"), read("split")
    assert [r["step"] for r in split_log] == [1, 2, 3, 4]
    for a, b in zip(whole_log, split_log, strict=True):
        for k in ("loss", "nll", "kl", "d_loss", "g_loss"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
    assert (tmp_path / "split" / "losses.png").exists()


@pytest.mark.slow
def test_checkpoint_round_trip_and_errors(tmp_path, vae):
    config = train.TrainConfig(disc_weight=0.5, ema_decay=0.99)
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    path = tmp_path / "state.eqx"
    train.save_checkpoint(path, state, config=config, position=train.DataPosition(3, 7))
    loaded, position, header = train.load_checkpoint(path, state)
    assert position == train.DataPosition(3, 7)
    assert train.TrainConfig.from_dict(header["config"]) == config and header["step"] == 0
    _assert_trees_close(loaded, state, rtol=0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(eqx_vae.CheckpointError):
        train.load_checkpoint(path, state)
    eqx_vae.save(tmp_path / "model.eqx", vae)
    with pytest.raises(eqx_vae.CheckpointError, match="training checkpoint"):
        train.load_checkpoint(tmp_path / "model.eqx", state)


@pytest.mark.slow
def test_short_training_lowers_the_loss(tmp_path, vae):
    config = train.TrainConfig(
        disc_weight=0.0, learning_rate=3e-3, betas=(0.9, 0.99), ema_decay=0.9
    )
    optimizers = train.make_optimizers(config)
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    data = train.ImageFolder(_image_folder(tmp_path), crop_size=16, batch_size=4, seed=3)
    samples = data.batch(train.DataPosition(epoch=99))[0][:2]
    train.fit(
        state,
        config,
        data,
        optimizers,
        steps=40,
        out=tmp_path / "run",
        key=jax.random.key(15),
        log_every=10,
        sample_every=20,
        samples=samples,
        progress=False,
    )
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    losses = [r["loss"] for r in log]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.7 * losses[0]
    assert log[-1]["rec"] < 0.8 * log[0]["rec"]
    assert log[-1]["psnr"] > log[0]["psnr"] + 1.5
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step_0000020.png",
        "step_0000040.png",
    ]


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
