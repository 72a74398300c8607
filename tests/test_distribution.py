import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config
from hypothesis import given, settings, strategies as st

import eqx_vae
from eqx_vae import DiagonalGaussian


def _random_gaussian(key, shape=(4, 5, 6)):
    k1, k2 = jax.random.split(key)
    return DiagonalGaussian(
        jax.random.normal(k1, shape), jax.random.uniform(k2, shape, minval=-3.0, maxval=1.0)
    )


def test_from_moments_splits_and_clamps():
    moments = jnp.concatenate([jnp.full((2, 3, 3), 0.5), jnp.full((2, 3, 3), 100.0)])
    d = DiagonalGaussian.from_moments(moments)
    assert d.mean.shape == (2, 3, 3)
    np.testing.assert_array_equal(d.mean, 0.5)
    np.testing.assert_array_equal(d.logvar, 20.0)
    np.testing.assert_array_equal(
        DiagonalGaussian(d.mean, jnp.full((2, 3, 3), -100.0)).logvar, -30.0
    )


def test_mode_is_mean(getkey):
    d = _random_gaussian(getkey())
    assert d.mode() is d.mean


@pytest.mark.slow
def test_sample_statistics(getkey):
    d = _random_gaussian(getkey(), (2, 3, 3))
    keys = jax.random.split(getkey(), 20000)
    samples = jax.vmap(d.sample)(keys)
    n = samples.shape[0]
    std = np.asarray(d.std)
    # 5 standard errors: a false failure has probability ~1e-5 per entry.
    np.testing.assert_array_less(np.abs(samples.mean(0) - d.mean), 5 * std / math.sqrt(n))
    np.testing.assert_allclose(samples.std(0), std, rtol=5 * math.sqrt(0.5 / n))
    # Different keys give different samples; the same key the same sample.
    np.testing.assert_array_equal(d.sample(keys[0]), d.sample(keys[0]))
    assert not np.allclose(d.sample(keys[0]), d.sample(keys[1]))


def test_kl_closed_form(getkey):
    d, o = _random_gaussian(getkey()), _random_gaussian(getkey())
    m, lv = np.asarray(d.mean, np.float64), np.asarray(d.logvar, np.float64)
    expected = 0.5 * np.sum(m**2 + np.exp(lv) - 1 - lv)
    np.testing.assert_allclose(d.kl(), expected, rtol=1e-5)
    mo, lvo = np.asarray(o.mean, np.float64), np.asarray(o.logvar, np.float64)
    expected = 0.5 * np.sum((m - mo) ** 2 / np.exp(lvo) + np.exp(lv - lvo) - 1 - lv + lvo)
    np.testing.assert_allclose(d.kl(o), expected, rtol=1e-5)
    np.testing.assert_allclose(d.kl(d), 0.0, atol=1e-4)


def test_nll_closed_form(getkey):
    d = _random_gaussian(getkey())
    x = jax.random.normal(getkey(), d.mean.shape)
    m, lv, xs = (np.asarray(a, np.float64) for a in (d.mean, d.logvar, x))
    expected = 0.5 * np.sum(np.log(2 * np.pi) + lv + (xs - m) ** 2 / np.exp(lv))
    np.testing.assert_allclose(d.nll(x), expected, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    mean=st.floats(-5, 5),
    logvar=st.floats(-10, 5),
)
def test_kl_is_nonnegative_and_zero_only_at_standard_normal(mean, logvar):
    d = DiagonalGaussian(
        jnp.full((1, 1, 1), mean, jnp.float32), jnp.full((1, 1, 1), logvar, jnp.float32)
    )
    kl = float(d.kl())
    assert kl >= -1e-6
    if abs(mean) > 1e-2 or abs(logvar) > 1e-1:
        assert kl > 0


@pytest.mark.slow
def test_batched_reductions_keep_batch_axes(getkey):
    d = _random_gaussian(getkey(), (3, 2, 4, 4))
    assert d.kl().shape == (3,)
    np.testing.assert_allclose(
        d.kl(), jax.vmap(lambda m, lv: DiagonalGaussian(m, lv).kl())(d.mean, d.logvar), rtol=1e-6
    )
    assert d.nll(d.mean).shape == (3,)


@pytest.mark.slow
def test_posterior_crosses_jit_and_vmap(getkey):
    model = eqx_vae.AutoencoderKL(small_config(), key=getkey())
    images = jax.random.uniform(getkey(), (3, 3, 8, 8), minval=-1, maxval=1)
    posterior = eqx.filter_jit(eqx.filter_vmap(model.encode))(images)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == (3, 4, 4, 4)
    single = model.encode(images[1])
    np.testing.assert_allclose(posterior.mean[1], single.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(posterior.logvar[1], single.logvar, rtol=1e-5, atol=1e-6)
    # A posterior can also be passed into a jitted function and sampled there.
    keys = jax.random.split(getkey(), 3)
    samples = eqx.filter_jit(lambda p, k: jax.vmap(DiagonalGaussian.sample)(p, k))(posterior, keys)
    assert samples.shape == (3, 4, 4, 4)
    np.testing.assert_allclose(samples[1], single.sample(keys[1]), rtol=1e-5, atol=1e-6)
