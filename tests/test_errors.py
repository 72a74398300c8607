"""Clear errors for bad input, and the runtime shape checks that tests run under."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from helpers import small_config

import eqx_vae


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(small_config(block_out_channels=(8, 8, 8)), key=jax.random.key(0))


def test_runtime_shape_checking_is_active(model):
    """The jaxtyping import hook (pyproject addopts) checks annotated shapes in tests."""
    with pytest.raises(jaxtyping.TypeCheckError):
        model.encode(jnp.zeros((4, 16, 16)))
    with pytest.raises(jaxtyping.TypeCheckError):
        model.decoder(jnp.zeros((3, 2, 2)))
    with pytest.raises(jaxtyping.TypeCheckError):
        eqx_vae.ResnetBlock2D(8, 16, 8, key=jax.random.key(0))(jnp.zeros((16, 4, 4)))


def test_wrong_channel_count(model, without_typechecks):
    with pytest.raises(ValueError, match=r"`encode` expects 3 channels, got shape \(4, 16, 16\)"):
        model.encode(jnp.zeros((4, 16, 16)))
    with pytest.raises(ValueError, match=r"`decode` expects 4 channels, got shape \(3, 2, 2\)"):
        model.decode(jnp.zeros((3, 2, 2)))


def test_channels_last_image_gets_layout_hint(model, without_typechecks):
    with pytest.raises(ValueError, match=r"channels-first.*transpose"):
        model.encode(jnp.zeros((16, 16, 3)))


def test_batch_axis_on_unbatched_call(model, without_typechecks):
    with pytest.raises(ValueError, match=r"unbatched.*jax\.vmap\(model\.encode\)"):
        model.encode(jnp.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"jax\.vmap\(model\.decode\)"):
        model.decode(jnp.zeros((2, 4, 2, 2)))


def test_size_not_a_multiple_of_the_spatial_factor(model, without_typechecks):
    with pytest.raises(
        ValueError, match=r"multiples of 4 .* got 18x16; pad or crop the image to 20x16 or 16x16"
    ):
        model.encode(jnp.zeros((3, 18, 16)))
    # With the checks on, this is caught by the explicit check too (no shape
    # annotation can express "a multiple of 4").
    jaxtyping.config.update("jaxtyping_disable", False)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(jnp.zeros((3, 18, 16)))


def test_integer_images(model, without_typechecks):
    with pytest.raises(TypeError, match=r"floating-point image, got dtype uint8.*127\.5"):
        model.encode(np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(TypeError, match="floating-point latent"):
        model.decode(jnp.zeros((4, 2, 2), jnp.int32))


def test_not_an_array(model, without_typechecks):
    with pytest.raises(TypeError, match="expects a JAX or NumPy array, got list"):
        model.encode([[[0.0]]])  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda k: eqx_vae.ResnetBlock2D(30, 30, 32, key=k),
            r"norm_num_groups=32.*30 channels of ResnetBlock2D",
        ),
        (
            lambda k: eqx_vae.AttentionBlock(20, 8, key=k),
            r"norm_num_groups=8.*20 channels of AttentionBlock",
        ),
        (
            lambda k: eqx_vae.Encoder(3, 4, (32, 48), 1, 32, key=k),
            r"norm_num_groups=32.*48 channels",
        ),
        (
            lambda k: eqx_vae.AutoencoderKL(small_config(norm_num_groups=12), key=k),
            r"norm_num_groups=12.*16",
        ),
    ],
)
def test_groups_must_divide_channels(build, match):
    with pytest.raises(ValueError, match=match):
        build(jax.random.key(0))


def test_model_requires_a_config_object(without_typechecks):
    with pytest.raises(TypeError, match="from_config"):
        eqx_vae.AutoencoderKL({"latent_channels": 4}, key=jax.random.key(0))  # pyright: ignore[reportArgumentType]
