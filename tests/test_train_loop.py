"""Training data, checkpoints and the fit loop."""

import itertools
import json

import jax
import numpy as np
import pytest
from helpers import require
from train_helpers import (
    assert_trees_close,
    batch_of_images,
    image_folder,
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


def test_image_folder_is_deterministic(tmp_path):
    folder = image_folder(tmp_path)
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
    folder = image_folder(tmp_path)
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


def test_image_folder_contrast_blends_each_crop_towards_its_mean(tmp_path):
    """`contrast` keeps the crop and its mean colour and scales its deviations from the
    mean by a factor from the range: 0 gives the mean colour alone."""
    folder = image_folder(tmp_path)
    plain = train.ImageFolder(folder, crop_size=16, batch_size=5, seed=4, scale=(0.5, 1.0))
    x, _ = plain.batch(train.DataPosition())
    for contrast, factors in [
        ((0.0, 0.0), (0.0, 0.0)),
        ((0.5, 0.5), (0.5, 0.5)),
        ((0.2, 0.9), (0.2, 0.9)),
    ]:
        dimmed = train.ImageFolder(
            folder, crop_size=16, batch_size=5, seed=4, scale=(0.5, 1.0), contrast=contrast
        )
        y, _ = dimmed.batch(train.DataPosition())
        mean = x.mean(axis=(2, 3), keepdims=True)
        np.testing.assert_allclose(y.mean(axis=(2, 3), keepdims=True), mean, atol=1e-5)
        # The same crops, every channel's deviation scaled by one factor per crop.
        factor = (y - mean).std(axis=(1, 2, 3)) / (x - mean).std(axis=(1, 2, 3))
        np.testing.assert_allclose(y - mean, factor[:, None, None, None] * (x - mean), atol=1e-5)
        assert (factors[0] - 1e-5 <= factor).all() and (factor <= factors[1] + 1e-5).all()
    assert np.ptp(factor) > 0.1  # drawn per crop
    with pytest.raises(ValueError, match="contrast range"):
        train.ImageFolder(folder, crop_size=16, batch_size=1, contrast=(0.5, 1.5))


def test_image_folder_colour_shift_offsets_each_channel(tmp_path):
    """`colour_shift` adds one offset per channel and crop, within the range, clipped to
    `[-1, 1]`; the crops are otherwise the plain ones."""
    folder = image_folder(tmp_path)
    plain = train.ImageFolder(folder, crop_size=16, batch_size=8, seed=2)
    shifted = train.ImageFolder(folder, crop_size=16, batch_size=8, seed=2, colour_shift=0.3)
    x, _ = plain.batch(train.DataPosition())
    y, _ = shifted.batch(train.DataPosition())
    assert y.min() >= -1 and y.max() <= 1
    # Each crop's channel offset, read where clipping did not touch it (a channel that
    # is clipped all over is a bound alone and is left out).
    unclipped = np.abs(y) < 1
    offsets = np.full(x.shape[:2], np.nan)
    for i, c in zip(*np.nonzero(unclipped.any(axis=(2, 3))), strict=True):
        offsets[i, c] = (y[i, c] - x[i, c])[unclipped[i, c]][0]
    known = np.isfinite(offsets)
    assert known.sum() >= 20
    assert np.abs(offsets[known]).max() <= 0.3 + 1e-6 and np.ptp(offsets[known]) > 0.2
    expected = np.clip(x + offsets[:, :, None, None], -1, 1)
    np.testing.assert_allclose(y[known], expected[known], atol=1e-6)
    assert (np.abs(y[~known]) == 1).all()
    with pytest.raises(ValueError, match="colour shift"):
        train.ImageFolder(folder, crop_size=16, batch_size=1, colour_shift=-0.1)


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
    data = train.ImageFolder(image_folder(tmp_path), crop_size=32, batch_size=2, seed=3)
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
    assert_trees_close(resumed, whole, rtol=1e-5)
    read = lambda name: [  # noqa: E731
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    whole_log, split_log = read("whole"), read("split")
    assert [r["step"] for r in split_log] == [1, 2, 3, 4]
    for a, b in zip(whole_log, split_log, strict=True):
        for k in ("loss", "nll", "kl", "d_loss", "g_loss"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
    assert (tmp_path / "split" / "losses.png").exists()


def test_fit_measures_the_latent_statistics_at_the_end(tmp_path, vae):
    state = _fit(tmp_path, vae, 1, tmp_path / "run", statistics_batches=2)
    record = json.loads((tmp_path / "run" / "latent_statistics.json").read_text())
    data = train.ImageFolder(image_folder(tmp_path), crop_size=32, batch_size=2, seed=3)
    position, batches = train.DataPosition(epoch=10_000), []
    for _ in range(2):
        batch, position = data.batch(position)
        batches.append(batch)
    assert state.ema is not None
    stats = eqx_vae.latent_statistics(state.ema, batches)
    assert record["images"] == 4
    np.testing.assert_allclose(record["mean"], stats.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(record["global_std"], stats.global_std, rtol=1e-6)
    loaded = eqx_vae.LatentStatistics.from_dict(record)
    assert record["conventions"]["scaling"] == loaded.config_fields("scaling")
    np.testing.assert_allclose(
        record["conventions"]["per_channel"]["latents_std"], stats.std, rtol=1e-6
    )


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
    assert_trees_close(loaded, state, rtol=0)
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
    data = train.ImageFolder(image_folder(tmp_path), crop_size=16, batch_size=4, seed=3)
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
