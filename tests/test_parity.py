"""Parity with diffusers' PyTorch AutoencoderKL and AutoencoderKLFlux2 (with the FLUX.2
pipeline's latent normalisation): against committed fixtures (no torch needed) and live
(with torch and diffusers installed)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, RTOL, assert_close, load_fixture, parameters_of, require_torch
from parity_cases import CASES, diffusers_reference

import eqx_vae


def _check_against(
    model: eqx_vae.AutoencoderKL, ref: dict, policy: eqx_vae.Policy | None = None
) -> None:
    image = jnp.asarray(ref["image"])
    posterior = eqx.filter_jit(model.encode)(image, policy=policy)
    assert_close(posterior.mean, ref["mean"], what="encoder mean")
    assert_close(posterior.logvar, ref["logvar"], what="encoder logvar")
    assert_close(posterior.kl(), ref["kl"], what="kl")
    decoded = eqx.filter_jit(model.decode)(jnp.asarray(ref["latent"]), policy=policy)
    assert_close(decoded, ref["decoded"], what="decode")
    assert_close(
        eqx.filter_jit(model)(image, policy=policy), ref["reconstruction"], what="round trip"
    )
    if "scaled" in ref:  # FLUX.2: the pipeline's patchify and BatchNorm normalisation
        scaled = eqx.filter_jit(model.scale_latents)(posterior.mode())
        assert_close(scaled, ref["scaled"], what="scale_latents")
        unscaled = eqx.filter_jit(model.unscale_latents)(jnp.asarray(ref["scaled_latent"]))
        assert_close(unscaled, ref["unscaled"], what="unscale_latents")


FIXTURE_PATHS = sorted(FIXTURES.glob("parity_*.npz"))


def test_fixtures_cover_every_case():
    assert {p.stem.removeprefix("parity_") for p in FIXTURE_PATHS} == {c.name for c in CASES}


# The one-level case runs in the fast subset; the others with the slow tests.
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=() if "one_level" in p.stem else pytest.mark.slow)
        for p in FIXTURE_PATHS
    ],
    ids=lambda p: p.stem,
)
def test_parity_with_fixture(path):
    config, state_dict, ref = load_fixture(path)
    model = eqx_vae.from_diffusers_state_dict(state_dict, config)
    _check_against(model, ref)


@pytest.mark.slow
@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.stem)
def test_parity_with_fixture_using_winograd(path):
    """The Winograd convolution on every 3x3 convolution, not only on wide ones."""
    config, state_dict, ref = load_fixture(path)
    policy = eqx_vae.Policy(conv="winograd")
    _check_against(eqx_vae.from_diffusers_state_dict(state_dict, config), ref, policy)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["taps", "direct"])
@pytest.mark.parametrize("name", ["one_level_lpb1", "sd_shaped", "flux_shaped_no_attention"])
def test_parity_with_fixture_using_each_other_convolution(name, algorithm):
    """The few-channel tap convolution on every 3x3 convolution, and the direct one
    everywhere (what runs on GPU and TPU)."""
    config, state_dict, ref = load_fixture(FIXTURES / f"parity_{name}.npz")
    policy = eqx_vae.Policy(conv=algorithm)
    _check_against(eqx_vae.from_diffusers_state_dict(state_dict, config), ref, policy)


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity_live(case):
    require_torch()
    seed = [c.name for c in CASES].index(case.name)
    ref = diffusers_reference(case, seed)
    state_dict = parameters_of(ref)
    model = eqx_vae.from_diffusers_state_dict(state_dict, case.config)
    _check_against(model, ref)

    # The committed fixture still describes what diffusers computes.
    _, fixture_weights, fixture = load_fixture(FIXTURES / f"parity_{case.name}.npz")
    for name, value in state_dict.items():
        np.testing.assert_array_equal(value, fixture_weights[name])
    for name in ("mean", "logvar", "decoded", "reconstruction", "scaled", "unscaled"):
        if name in ref:
            assert_close(fixture[name], ref[name], rtol=RTOL, what=f"fixture {name}")


@pytest.mark.torch
def test_parity_of_sample_with_shared_noise():
    """`sample(key)` is `mean + std * eps`, as in diffusers, given the same eps."""
    torch, _ = require_torch()
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.default_rng(0)
    moments = rng.standard_normal((1, 8, 5, 6)).astype(np.float32)
    ref_dist = DiagonalGaussianDistribution(torch.from_numpy(moments))
    ours = eqx_vae.DiagonalGaussian.from_moments(jnp.asarray(moments[0]))
    key = jax.random.key(0)
    eps = jax.random.normal(key, ours.mean.shape)
    expected = ref_dist.mean[0].numpy() + ref_dist.std[0].numpy() * np.asarray(eps)
    assert_close(ours.sample(key), expected, rtol=1e-6)
    other = eqx_vae.DiagonalGaussian.from_moments(jnp.asarray(moments[0][::-1].copy()))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(moments[:, ::-1].copy()))
    assert_close(ours.kl(other), ref_dist.kl(ref_other)[0].numpy(), rtol=1e-6)
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    assert_close(
        ours.nll(jnp.asarray(x)), ref_dist.nll(torch.from_numpy(x[None]))[0].numpy(), rtol=1e-6
    )
