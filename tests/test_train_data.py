"""Synthetic training data (dead leaves) and mixtures of sources."""

import json

import jax
import numpy as np
import pytest
from helpers import require, small_config
from train_helpers import assert_trees_close, image_folder, small_vae

import eqx_vae
from eqx_vae import train


optax = require("optax")


def _spectrum_slope(images: np.ndarray) -> float:
    """The slope of the log radial power spectrum of the images' channel mean against
    log frequency (about -2 for photographs, 0 for white noise)."""
    grey = images.mean(axis=1)
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(grey)) ** 2).mean(axis=0)
    n = grey.shape[-1]
    f = np.fft.fftfreq(n) * n
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    bands = np.arange(2, n // 4)
    levels = [power[(radius >= k - 0.5) & (radius < k + 0.5)].mean() for k in bands]
    return float(np.polyfit(np.log(bands), np.log(levels), 1)[0])


def test_dead_leaves_are_deterministic_images():
    a = train.DeadLeaves(crop_size=32, batch_size=3, seed=5)
    b = train.DeadLeaves(crop_size=32, batch_size=3, seed=5)
    first, position = a.batch(train.DataPosition())
    assert first.shape == (3, 3, 32, 32) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.min() >= -1 and first.max() <= 1
    assert position == train.DataPosition(0, 3)
    np.testing.assert_array_equal(first, b.batch(train.DataPosition())[0])
    # A sample depends on its position alone, and the stream gives the same batches.
    np.testing.assert_array_equal(a.sample(7, 2), b.sample(7, 2))
    stream = a.batches(train.DataPosition(4, 1))
    position = train.DataPosition(4, 1)
    for _ in range(2):
        streamed, after = next(stream)
        expected, position = b.batch(position)
        assert after == position
        np.testing.assert_array_equal(streamed, expected)
    stream.close()
    # Epochs wrap at epoch_size.
    short = train.DeadLeaves(crop_size=16, batch_size=3, seed=5, epoch_size=2)
    _, position = short.batch(train.DataPosition(0, 1))
    assert position == train.DataPosition(1, 2)
    other = train.DeadLeaves(crop_size=32, batch_size=3, seed=6)
    assert not np.array_equal(first, other.batch(train.DataPosition())[0])


def test_dead_leaves_cover_the_image_with_the_palette():
    """Flat discs without blur, noise or antialiasing: every pixel is one of the
    palette's colours, and the discs' edges give many regions."""
    palette = np.array([[-1.0, -1.0, 1.0], [1.0, 0.5, -0.5], [0.0, 0.0, 0.0]])
    data = train.DeadLeaves(
        crop_size=48,
        batch_size=4,
        seed=0,
        colours=palette,
        texture=0.0,
        blur=(0.0, 0.0),
        noise=(0.0, 0.0),
        supersample=1,
    )
    images, _ = data.batch(train.DataPosition())
    pixels = np.moveaxis(images, 1, -1).reshape(-1, 3)
    distance = np.abs(pixels[:, None, :] - palette[None].astype(np.float32)).max(axis=-1)
    assert distance.min(axis=1).max() == 0
    # Every colour appears, and neighbouring pixels differ along many edges.
    assert (np.bincount(distance.argmin(axis=1), minlength=3) > 0).all()
    assert np.mean(np.any(images[:, :, 1:] != images[:, :, :-1], axis=1)) > 0.02


def test_dead_leaves_have_the_spectrum_of_photographs():
    """Power-law radii down to a pixel give the 1 / f^2 power spectrum of natural
    images; a steeper radius law (more small discs) gives a flatter spectrum."""

    def sample(**kwargs):
        kwargs = {"radius": (1.0, None), "blur": (0.0, 1.0)} | kwargs
        data = train.DeadLeaves(crop_size=64, batch_size=1, seed=1, **kwargs)
        return np.stack([data.sample(0, i) for i in range(32)])

    slope = _spectrum_slope(sample())
    assert -2.5 < slope < -1.6, slope
    assert _spectrum_slope(sample(exponent=2.0)) < slope < _spectrum_slope(sample(exponent=4.0))
    # Blur removes fine detail.
    sharp = sample(blur=(0.0, 0.0), noise=(0.0, 0.0))
    blurred = sample(blur=(2.0, 2.0), noise=(0.0, 0.0))
    gradient = lambda x: np.abs(np.diff(x, axis=-1)).mean()  # noqa: E731
    assert gradient(blurred) < 0.5 * gradient(sharp)


def test_dead_leaves_contrast_blends_towards_one_colour():
    """`contrast` blends each image towards one palette colour by a factor from its
    range: at 0 the image is that colour alone, at 1/2 every pixel is halfway between the
    full-contrast image and it."""
    palette = np.array([[-1.0, -1.0, 1.0], [1.0, 0.5, -0.5], [0.0, 0.0, 0.0]])
    common = {
        "crop_size": 32,
        "batch_size": 1,
        "seed": 4,
        "colours": palette,
        "texture": 0.0,
        "blur": (0.0, 0.0),
        "noise": (0.0, 0.0),
    }
    full = train.DeadLeaves(**common).sample(0, 0)
    for i in range(6):
        flat = train.DeadLeaves(**common, contrast=(0.0, 0.0)).sample(0, i)
        colour = flat[:, 0, 0]
        assert np.abs(palette - colour).max(axis=1).min() < 1e-6
        np.testing.assert_array_equal(flat, np.broadcast_to(colour[:, None, None], flat.shape))
    half = train.DeadLeaves(**common, contrast=(0.5, 0.5)).sample(0, 0)
    base = 2 * half - full  # half = base + (full - base) / 2
    np.testing.assert_allclose(base, np.broadcast_to(base[:, :1, :1], base.shape), atol=1e-6)
    assert full.std() > 0.3
    np.testing.assert_allclose(half.std(axis=(1, 2)), full.std(axis=(1, 2)) / 2, rtol=1e-5)


def test_dead_leaves_errors():
    for kwargs, message in [
        ({"crop_size": 0}, "positive crop"),
        ({"radius": (4.0, 2.0)}, "radii"),
        ({"exponent": 1.0}, "exponent above 1"),
        ({"blur": (1.0, 0.5)}, "blur"),
        ({"noise": (-0.1, 0.1)}, "noise"),
        ({"colours": np.zeros((4, 4))}, r"shape \(N, 3\)"),
        ({"contrast": (0.5, 1.5)}, "contrast range"),
    ]:
        arguments = {"crop_size": 16, "batch_size": 2} | kwargs
        with pytest.raises(ValueError, match=message):
            train.DeadLeaves(**arguments)


def test_mixture_draws_each_source_by_weight(tmp_path):
    folder = train.ImageFolder(image_folder(tmp_path), crop_size=16, batch_size=1, seed=1)
    leaves = train.DeadLeaves(crop_size=16, batch_size=1, seed=2)
    mixture = train.Mixture([folder, leaves], [0.25, 0.75], batch_size=4, seed=3)
    again = train.Mixture([folder, leaves], [0.25, 0.75], batch_size=4, seed=3)
    position = train.DataPosition()
    from_folder = 0
    for _ in range(50):
        batch, after = mixture.batch(position)
        np.testing.assert_array_equal(batch, again.batch(position)[0])
        for i, sample in enumerate(batch):
            epoch, index = position.epoch, position.index + i
            n = epoch * mixture.epoch_size + index
            # The n-th sample of the mixture is the n-th sample of its source.
            candidates = [s.sample(*divmod(n, s.epoch_size)) for s in (folder, leaves)]
            matches = [np.array_equal(sample, c) for c in candidates]
            assert sum(matches) == 1
            from_folder += matches[0]
        position = after
    assert 0.15 < from_folder / 200 < 0.35, from_folder
    # A source of weight 0 never appears.
    only = train.Mixture([folder, leaves], [0.0, 1.0], batch_size=4, seed=3)
    batch, _ = only.batch(train.DataPosition())
    for i, sample in enumerate(batch):
        np.testing.assert_array_equal(sample, leaves.sample(0, i))


def test_mixture_errors(tmp_path):
    leaves = train.DeadLeaves(crop_size=16, batch_size=1)
    with pytest.raises(ValueError, match="at least one source"):
        train.Mixture([], batch_size=2)
    with pytest.raises(ValueError, match="2 sources and 1 weights"):
        train.Mixture([leaves, leaves], [1.0], batch_size=2)
    with pytest.raises(ValueError, match="non-negative weights"):
        train.Mixture([leaves, leaves], [1.0, -1.0], batch_size=2)
    with pytest.raises(ValueError, match=r"different sizes: \[16, 32\]"):
        train.Mixture([leaves, train.DeadLeaves(crop_size=32, batch_size=1)], batch_size=2)


def test_alternating_takes_batches_from_each_stream_in_turn(tmp_path):
    """Batch `n` is batch `n // 2` of stream `n % 2`, each stream with its own crop and
    batch size, across the alternation's epochs; the positions a resumed run starts
    from give the same batches."""
    small = train.ImageFolder(image_folder(tmp_path), crop_size=16, batch_size=4, seed=1)
    large = train.DeadLeaves(crop_size=32, batch_size=1, seed=2, epoch_size=3)
    data = train.Alternating([small, large], epoch_size=5)
    assert data.batch_size == 4
    position, own = train.DataPosition(), [train.DataPosition(), train.DataPosition()]
    positions = []
    for n in range(12):
        positions.append(position)
        batch, position = data.batch(position)
        assert position == train.DataPosition(*divmod(n + 1, 5))
        expected, own[n % 2] = (small, large)[n % 2].batch(own[n % 2])
        assert batch.shape == ((4, 3, 16, 16) if n % 2 == 0 else (1, 3, 32, 32))
        np.testing.assert_array_equal(batch, expected)
    # Started at any position, the stream goes on as it would have.
    again = train.Alternating([small, large], epoch_size=5)
    batches = again.batches(positions[7])
    for n in range(7, 12):
        batch, after = next(batches)
        np.testing.assert_array_equal(batch, data.batch(positions[n])[0])
        assert after == data.batch(positions[n])[1]
    batches.close()
    with pytest.raises(ValueError, match="at least one source"):
        train.Alternating([])
    with pytest.raises(TypeError, match="whole batches"):
        data.sample(0, 0)


def test_fit_trains_on_alternating_crop_sizes(tmp_path):
    """`fit` on crops of two sizes in turn (a 16-pixel batch of 4, then a 32-pixel batch
    of 1): one compiled step per shape."""
    config = train.TrainConfig(learning_rate=2e-3, betas=(0.9, 0.99), disc_weight=0.0)
    optimizers = train.make_optimizers(config)
    vae = eqx_vae.AutoencoderKL(
        small_config(block_out_channels=(8,), norm_num_groups=4), key=jax.random.key(0)
    )
    state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
    data = train.Alternating(
        [
            train.DeadLeaves(crop_size=16, batch_size=4, seed=1),
            train.DeadLeaves(crop_size=32, batch_size=1, seed=2),
        ]
    )
    state = train.fit(
        state,
        config,
        data,
        optimizers,
        steps=2,
        out=tmp_path / "run",
        key=jax.random.key(5),
        log_every=1,
        progress=False,
    )
    assert int(state.step) == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_fit_on_a_mixture_resumes_exactly(tmp_path):
    """`fit` trains on a mixture of photographs and dead leaves, and a run stopped and
    resumed equals an uninterrupted one."""
    vae = small_vae()
    folder = image_folder(tmp_path)

    def run(steps, out):
        config = train.TrainConfig(learning_rate=2e-3, betas=(0.9, 0.99), ema_decay=0.9)
        optimizers = train.make_optimizers(config)
        state = train.init_state(vae, config, optimizers, key=jax.random.key(4))
        data = train.Mixture(
            [
                train.ImageFolder(folder, crop_size=32, batch_size=2, seed=3),
                train.DeadLeaves(crop_size=32, batch_size=2, seed=4),
            ],
            batch_size=2,
            seed=5,
        )
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
        )

    whole = run(4, tmp_path / "whole")
    run(2, tmp_path / "split")
    resumed = run(4, tmp_path / "split")
    assert int(resumed.step) == 4
    assert_trees_close(resumed, whole, rtol=1e-5)
    losses = lambda name: [  # noqa: E731
        json.loads(line)["loss"]
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    np.testing.assert_allclose(losses("split"), losses("whole"), rtol=1e-5)
