"""What the public API promises across its modules."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config

import eqx_vae


LOADERS = [
    eqx_vae.load_builtin,
    eqx_vae.load_diffusers,
    eqx_vae.load_single_file,
    eqx_vae.from_pretrained,
    eqx_vae.from_diffusers_state_dict,
    eqx_vae.from_flax_params,
]


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
def test_every_loader_gives_float32_parameters_unless_told_otherwise(loader, tmp_path):
    assert inspect.signature(loader).parameters["dtype"].default is None
    # Stored in float16, like the built-in model, so that keeping the stored dtype and
    # converting to float32 differ.
    model = eqx_vae.AutoencoderKL(small_config(), dtype=jnp.float16, key=jax.random.key(0))
    arguments = {
        eqx_vae.load_builtin: (),
        eqx_vae.load_diffusers: (tmp_path,),
        eqx_vae.from_pretrained: (tmp_path,),
        eqx_vae.load_single_file: (tmp_path / "vae.safetensors",),
        eqx_vae.from_diffusers_state_dict: (
            eqx_vae.to_diffusers_state_dict(model),
            model.config,
        ),
        eqx_vae.from_flax_params: (eqx_vae.to_flax_params(model), model.config),
    }[loader]
    extra = {"config": model.config} if loader is eqx_vae.load_single_file else {}
    eqx_vae.save_diffusers(tmp_path, model)
    eqx_vae.save_single_file(tmp_path / "vae.safetensors", model)
    for dtype, expected in [
        (None, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.float16, jnp.float16),
        (jnp.bfloat16, jnp.bfloat16),
    ]:
        for call in [{"dtype": dtype}] + ([{}] if dtype is None else []):
            loaded = loader(*arguments, **extra, **call)
            dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(loaded)}
            assert dtypes == {jnp.dtype(expected)}, (call, dtypes)


def test_metrics_live_in_their_own_module():
    import eqx_vae.metrics
    from eqx_vae.metrics import bicubic_baseline, psnr, ssim

    for name in ("psnr", "ssim", "bicubic_baseline"):
        assert not hasattr(eqx_vae, name), name
    x = jnp.zeros((3, 16, 16), jnp.float32)
    y = x.at[0].set(0.2)  # mean squared error 0.04 / 3
    np.testing.assert_allclose(psnr(x, y), 10 * np.log10(4 / (0.04 / 3)), rtol=1e-5)
    np.testing.assert_allclose(ssim(y, y), 1.0, rtol=1e-6)
    np.testing.assert_allclose(bicubic_baseline(y, 48), y, atol=1e-6)  # constant channels
    assert eqx_vae.metrics.psnr is psnr


def test_colour_chart_and_flat_colours():
    """The chart holds every colour of `COLOUR_CHART` in its patch (so that the
    chart's own errors are zero), and an error shows up in its patch alone."""
    from eqx_vae.metrics import COLOUR_CHART, colour_chart, colour_chart_errors, flat_colours

    chart = colour_chart(patch=16, columns=6)
    assert chart.shape == (3, 4 * 16, 6 * 16) and len(COLOUR_CHART) == 20
    errors = colour_chart_errors(chart, patch=16, columns=6, inset=2)
    assert list(errors) == list(COLOUR_CHART)
    assert max(np.abs(e).max() for e in errors.values()) < 1e-6
    shifted = chart.copy()
    shifted[1, 16:32, 32:48] += 0.1  # the ninth colour, grey: row 1, column 2
    errors = colour_chart_errors(shifted, patch=16, columns=6, inset=2)
    np.testing.assert_allclose(errors["grey"], [0.0, 0.1, 0.0], atol=1e-6)
    assert all(np.abs(e).max() < 1e-6 for name, e in errors.items() if name != "grey")
    flat = flat_colours(8)
    assert flat.shape == (20, 3, 8, 8)
    np.testing.assert_allclose(flat[0, :, 3, 5], [1.0, -1.0, -1.0])  # red
    np.testing.assert_allclose(flat[8].std(axis=(1, 2)), 0.0)


def test_latent_batch_norm_is_public():
    """FLUX.2's statistics as a module of their own, for models that carry a latent
    normalisation of their own."""
    bn = eqx_vae.LatentBatchNorm(8, eps=0.25)
    z = jnp.full((2, 8, 3, 5), 2.0, jnp.float32)
    np.testing.assert_allclose(bn(z), z / np.sqrt(1.25), rtol=1e-6)
    np.testing.assert_allclose(bn.inverse(bn(z)), z, rtol=1e-6)
    model = eqx_vae.AutoencoderKL(small_config(patch_size=(2, 2)), key=jax.random.key(0))
    assert isinstance(model.bn, eqx_vae.LatentBatchNorm) and model.bn.channels == 16
