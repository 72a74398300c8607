"""What the training tests share: a small autoencoder, a batch of images, tree
comparisons, an image folder and a compiled train step."""

import functools

import equinox as eqx
import jax
import numpy as np
from helpers import assert_close, small_config

import eqx_vae


@functools.cache
def small_vae() -> eqx_vae.AutoencoderKL:
    return eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))


@functools.cache
def batch_of_images() -> jax.Array:
    # 32 px: the least the discriminator's three stride-2 layers take.
    return jax.random.uniform(jax.random.key(1), (4, 3, 32, 32), minval=-1.0, maxval=1.0)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def assert_trees_close(a, b, rtol=1e-5, whole_tree=False):
    """Every leaf within `rtol` of the other's largest magnitude (the parity tolerance's
    form), or with `whole_tree` of the largest magnitude in the whole tree (for
    gradients, where some leaves are zero up to rounding: the biases that a GroupNorm
    follows); `rtol=0` asks for equality."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    scale = max(float(np.max(np.abs(y))) for y in lb if y.size)
    for x, y in zip(la, lb, strict=True):
        if rtol == 0:
            np.testing.assert_array_equal(x, y)
        elif whole_tree:
            assert float(np.max(np.abs(x - y), initial=0.0)) <= rtol * scale
        else:
            assert_close(x, y, rtol=rtol)


def image_folder(tmp_path, count=5):
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


def make_step(config, lpips=None):
    from eqx_vae import train

    optimizers = train.make_optimizers(config)
    return optimizers, eqx.filter_jit(train.make_train_step(config, optimizers, lpips))
