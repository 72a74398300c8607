"""The small autoencoder that ships with eqx_vae, trained on photographs."""

import pathlib

import jax
import jax.numpy as jnp

from ._autoencoder import AutoencoderKL
from ._config import AutoencoderKLConfig
from ._custom_types import DTypeLike
from ._serialisation import load
from ._state_dict import cast_floating


BUILTIN_PATH = pathlib.Path(__file__).parent / "pretrained" / "photos_f4.eqx"


def builtin_config() -> AutoencoderKLConfig:
    """The architecture of the built-in model: three levels of width 32, 64 and 128
    (spatial factor 4), one ResNet block per level, a 4-channel latent: the SD
    autoencoder's design at a size that trains on a CPU. GroupNorm has 8 groups, so
    that groups hold 4, 8 and 16 channels as in SD's 128/256/512-wide levels (with one
    channel per group, the normalisation would erase each channel's mean, and with it
    the image's overall colour)."""
    levels = 3
    return AutoencoderKLConfig(
        block_out_channels=(32, 64, 128),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
    )


def load_builtin(dtype: DTypeLike | None = None) -> AutoencoderKL:
    """The built-in autoencoder: the architecture of `builtin_config()` trained by
    `examples/train_builtin.py` on scikit-image's colour photographs and synthetic
    dead-leaves images (PSNR, SSIM and colour errors on held-out photographs are in
    the README).

    Its `scaling_factor` maps the latents of the training photographs to unit
    standard deviation, as in Stable Diffusion.

    Flat and low-contrast images are its weak point: they come back with a colour
    cast (a flat mid-grey as magenta; README gives the figures).

    **Arguments:**

    - `dtype`: parameter dtype; float32 by default, as for every loader. The model is
        stored in float16, so `jnp.float16` gives the stored values unchanged.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][].
    """
    if not BUILTIN_PATH.exists():
        raise FileNotFoundError(
            f"The built-in model {BUILTIN_PATH} is missing from this installation; "
            "`python examples/train_builtin.py --install` trains and writes it."
        )
    return cast_floating(load(BUILTIN_PATH), jnp.float32 if dtype is None else dtype)


def with_config(model: AutoencoderKL, config: AutoencoderKLConfig) -> AutoencoderKL:
    """`model`'s parameters under `config`, which may differ only in fields that leave
    the parameters' structure alone (the latent scaling, `sample_size`, ...)."""
    skeleton = jax.eval_shape(lambda: AutoencoderKL(config, key=jax.random.key(0)))
    leaves, structure = jax.tree_util.tree_flatten(model)
    expected = jax.tree_util.tree_structure(skeleton)
    if structure.num_leaves != expected.num_leaves:
        raise ValueError("`config` describes parameters other than `model`'s.")
    return jax.tree_util.tree_unflatten(expected, leaves)
