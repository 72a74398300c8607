"""The built-in model: its colours and the figures README gives for it."""

import dataclasses
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require, small_config

import eqx_vae


PATCH = 32
INSET = 6


def test_builtin_model_reconstructs_a_colour_chart():
    """Every patch's mean colour, away from its edges, comes back within 0.08 per
    channel on the [-1, 1] scale, and most within 0.05 (the shipped weights: 18 of
    20; magenta 0.063 and yellow 0.071 are the exceptions)."""
    model = eqx_vae.load_builtin()
    chart = eqx_vae.metrics.colour_chart(PATCH)
    recon = np.asarray(
        jnp.clip(eqx.filter_jit(lambda m, x: m(x))(model, jnp.asarray(chart)), -1, 1)
    )
    errors = eqx_vae.metrics.colour_chart_errors(recon, PATCH, inset=INSET)
    worst = {name: float(np.abs(e).max()) for name, e in errors.items()}
    report = {k: round(v, 3) for k, v in worst.items()}
    assert max(worst.values()) < 0.08, report
    assert sum(v < 0.05 for v in worst.values()) >= 18, report


def import_train_builtin():
    root = pathlib.Path(__file__).parent.parent
    sys.path.insert(0, str(root / "examples"))
    try:
        import train_builtin  # pyright: ignore[reportMissingImports]
    finally:
        sys.path.remove(str(root / "examples"))
    return train_builtin


def test_tiled_colour_error_reconstructs_each_tile_on_its_own(getkey):
    """`train_builtin.py --evaluate --tiles`: the colour error of the image cropped to
    whole tiles, each tile reconstructed alone (six tiles in chunks of four: the last
    chunk padded), against the model called tile by tile."""
    train_builtin = import_train_builtin()
    model = eqx_vae.AutoencoderKL(small_config(), key=getkey())
    image = np.asarray(jax.random.uniform(getkey(), (3, 40, 50), minval=-1.0, maxval=1.0))
    got = train_builtin.tiled_colour_error(model, image, tile=16, chunk=4)
    call = eqx.filter_jit(lambda m, x: m(x))
    errors = [
        np.asarray(jnp.clip(call(model, jnp.asarray(tile)), -1, 1) - tile).mean(axis=(1, 2))
        for row in range(2)
        for col in range(3)
        for tile in [image[:, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16]]
    ]
    np.testing.assert_allclose(got, np.mean(errors, axis=0), rtol=1e-5, atol=1e-6)
    full = np.asarray(
        jnp.clip(call(model, jnp.asarray(image[:, :32, :48])), -1, 1) - image[:, :32, :48]
    )
    assert not np.allclose(got, full.mean(axis=(1, 2)), atol=1e-6)


def test_train_builtin_alternates_crop_sizes_in_both_stages(tmp_path, capsys):
    """`train_builtin.py --crop-size 16 32 --batch-size 4 1`: both stages take a batch
    of each size in turn (the second stage follows the first unless given its own
    sizes); one size by default; a batch size per crop size."""
    require("skimage")
    require("PIL.Image")
    from eqx_vae import train

    train_builtin = import_train_builtin()
    default = train_builtin.parse_args([])
    assert (default.crop_size, default.batch_size) == ([64], [8])
    assert (default.tune_crop_size, default.tune_batch_size) == ([64], [8])
    args = train_builtin.parse_args(["--crop-size", "16", "32", "--batch-size", "4", "1"])
    assert (args.tune_crop_size, args.tune_batch_size) == ([16, 32], [4, 1])
    train_builtin.export_photos(tmp_path)
    for stage in (1, 2):
        data = train_builtin.stage_data(args, tmp_path, stage)
        position = train.DataPosition()
        shapes = []
        for _ in range(3):
            batch, position = data.batch(position)
            assert np.abs(batch).max() <= 1
            shapes.append(batch.shape)
        assert shapes == [(4, 3, 16, 16), (1, 3, 32, 32), (4, 3, 16, 16)], stage
    # The latent scaling measured on both sizes' latents.
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    assert np.isfinite(train_builtin.latent_scaling(model, data))
    single = train_builtin.stage_data(train_builtin.parse_args(["--crop-size", "16"]), tmp_path, 1)
    assert single.batch(train.DataPosition())[0].shape == (8, 3, 16, 16)
    tuned = train_builtin.parse_args([*("--crop-size", "16", "32"), "--tune-crop-size", "24"])
    assert (tuned.batch_size, tuned.tune_crop_size, tuned.tune_batch_size) == ([8, 8], [24], [8])
    with pytest.raises(SystemExit):
        train_builtin.parse_args(["--crop-size", "64", "128", "--batch-size", "8"])
    assert "one batch size per --crop-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_builtin.parse_args(["--tiles", "64"])
    assert "--tiles needs --evaluate" in capsys.readouterr().err


def test_train_builtin_third_stage_options_and_data(tmp_path, capsys):
    """The third stage's options (128-pixel crops in batches of 4 by default, the error
    of 8-pixel block means weighed 30 times more) and data: the second stage's streams
    and seeds at `--final-crop-size`."""
    require("skimage")
    require("PIL.Image")
    require("sklearn")
    require("matplotlib")
    from eqx_vae import train

    train_builtin = import_train_builtin()
    default = train_builtin.parse_args([])
    assert (default.final_steps, default.final_crop_size, default.final_batch_size) == (
        300,
        [128],
        [4],
    )
    assert default.final_colour_weight == 30.0 and not default.final_encoder
    assert (
        default.norm_groups == 8
        and train_builtin.parse_args(["--norm-groups", "4"]).norm_groups == 4
    )
    assert train_builtin.parse_args(["--norm-groups", "4"]).architecture == dataclasses.replace(
        eqx_vae.builtin_config(), norm_num_groups=4
    )
    base = train.TrainConfig(reconstruction="l1", learning_rate=2e-3, ema_decay=0.999)
    third = train_builtin.third_stage_config(base, default)
    assert third.decoder_only and (third.reconstruction, third.learning_rate) == ("l2", 5e-5)
    assert (third.colour_weight, third.ema_decay, third.decay_steps) == (30.0, 0.99, 300)
    both = train_builtin.parse_args(["--final-encoder"])
    assert not train_builtin.third_stage_config(base, both).decoder_only
    args = train_builtin.parse_args(
        ["--final-crop-size", "16", "24", "--final-batch-size", "2", "1"]
    )
    train_builtin.export_photos(tmp_path / "data")
    data = train_builtin.stage_data(args, tmp_path / "data", 3)
    position, shapes = train.DataPosition(), []
    for _ in range(2):
        batch, position = data.batch(position)
        shapes.append(batch.shape)
    assert shapes == [(2, 3, 16, 16), (1, 3, 24, 24)]
    # The second stage's streams and seeds at the third stage's sizes.
    same = train_builtin.parse_args(["--final-crop-size", "16", "--tune-crop-size", "16"])
    third = train_builtin.stage_data(same, tmp_path / "data", 3).batch(train.DataPosition())[0]
    second = train_builtin.stage_data(same, tmp_path / "data", 2).batch(train.DataPosition())[0]
    np.testing.assert_array_equal(third[:4], second[:4])
    for bad, message in [
        (["--final-crop-size", "16", "24", "--final-batch-size", "2"], "per --final-crop-size"),
        (["--start", "w.eqx", "--final-steps", "0"], "needs --final-steps above 0"),
        (["--norm-groups", "3"], "`norm_num_groups=3` does not divide"),
        (["--norm-groups", "0"], "`norm_num_groups` must be a positive"),
        (["--start", "w.eqx", "--norm-groups", "4"], "--start takes the weights' own"),
    ]:
        with pytest.raises(SystemExit):
            train_builtin.parse_args(bad)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_builtin_third_stage_trains_the_decoder_alone(tmp_path, capsys, getkey):
    """`train_builtin.py --start WEIGHTS`: the third stage alone, from saved weights.
    Only the decoder and `post_quant_conv` change, so the latent space stays the
    starting weights'; the run writes its evaluation and float16 weights."""
    require("skimage")
    require("PIL.Image")
    require("sklearn")
    require("matplotlib")
    import json

    train_builtin = import_train_builtin()
    # The built-in model's spatial factor (the held-out photographs are cropped to it),
    # without the mid-block attention: the run evaluates whole photographs, and attention
    # over their latents costs the square of the latent's pixel count.
    config = small_config(block_out_channels=(8, 16, 16), mid_block_add_attention=False)
    start = eqx_vae.AutoencoderKL(config, key=getkey())
    eqx_vae.save(tmp_path / "start.eqx", start)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--start", str(tmp_path / "start.eqx"), "--final-steps", "3"]
    sizes = ["--final-crop-size", "16", "--final-batch-size", "2"]
    # A high rate, so that every decoder weight moves by more than float16's spacing.
    train_builtin.main([*argv, *sizes, "--final-learning-rate", "1e-2"])
    capsys.readouterr()
    record = json.loads((out / "eval.json").read_text())
    assert record["start"] == str(tmp_path / "start.eqx") and record["final_steps"] == 3
    assert record["final_colour_weight"] == 30.0 and record["final_encoder"] is False
    assert "held_out_after_first_stage" not in record
    trained = eqx_vae.load(out / "photos_f4.eqx")
    assert trained.encoder.conv_in.weight.dtype == jnp.float16

    def leaves(module):
        return jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_inexact_array))

    for before, after in zip(
        leaves((start.encoder, start.quant_conv)),
        leaves((trained.encoder, trained.quant_conv)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(before, np.float16), after)
    changed = [
        not np.array_equal(np.asarray(before, np.float16), after)
        for before, after in zip(leaves(start.decoder), leaves(trained.decoder), strict=True)
    ]
    assert all(changed), changed
    assert (out / "final" / "checkpoint.eqx").exists()


def test_readme_reports_the_evaluation_of_the_shipped_model():
    """README's table of held-out photographs is `runs/builtin/eval.json`, which
    `examples/train_builtin.py` wrote for the shipped weights."""
    import json

    root = pathlib.Path(__file__).parent.parent
    record = json.loads((root / "runs" / "builtin" / "eval.json").read_text())
    readme = (root / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in record["held_out"]:
            rows[cells[0], cells[1]] = cells
    for group, results in record["held_out"].items():
        for name, r in [*results.items(), ("mean", record["means"][group])]:
            cells = rows[group, name]
            assert cells[2] == f"{r['psnr']:.2f} dB" and cells[3] == f"{r['bicubic_psnr']:.2f} dB"
            assert cells[4] == f"{r['ssim']:.3f}" and cells[5] == f"{r['bicubic_ssim']:.3f}"
    # The model's own figure for Chelsea, recomputed from the shipped weights.
    model = eqx_vae.load_builtin()
    from PIL import Image

    image = np.asarray(Image.open(root / "eqx_vae" / "pretrained" / "chelsea.png"))
    x = jnp.asarray(np.transpose(image[:300, :448, :3], (2, 0, 1)), jnp.float32) / 127.5 - 1
    recon = jnp.clip(eqx.filter_jit(lambda m, x: m(x))(model, x), -1, 1)
    psnr = float(eqx_vae.metrics.psnr(x, recon))
    assert abs(psnr - record["held_out"]["scikit-image"]["chelsea"]["psnr"]) < 0.05


@pytest.mark.slow
def test_train_builtin_evaluate_reports_the_shipped_weights(capsys):
    """`examples/train_builtin.py --evaluate` on the shipped (float16) weights gives the
    held-out figures of `runs/builtin/eval.json` (written from the float32 weights)
    within 0.05 dB, the colour chart of the test above, and README's figures for flat
    images: a flat mid-grey comes back magenta, green 0.24 low and blue 0.11 high, and
    seven of the twenty colours come back within 0.05."""
    import json

    root = pathlib.Path(__file__).parent.parent
    train_builtin = import_train_builtin()
    train_builtin.main(["--evaluate", str(root / "eqx_vae" / "pretrained" / "photos_f4.eqx")])
    report = json.loads(capsys.readouterr().out)
    record = json.loads((root / "runs" / "builtin" / "eval.json").read_text())
    for group, results in record["held_out"].items():
        for name, r in results.items():
            assert abs(report["held_out"][group][name]["psnr"] - r["psnr"]) < 0.05, name
    colours = report["colours"]
    assert colours["chart_largest_error"] < 0.08
    grey = colours["flat"]["grey"]
    assert abs(grey[1] + 0.24) < 0.01 and abs(grey[2] - 0.11) < 0.01, grey
    good = [n for n, e in colours["flat"].items() if max(abs(v) for v in e) < 0.05]
    expected = ["black", "dark grey", "light grey", "dark skin", "light skin", "deep skin"]
    assert good == [*expected, "orange"], good
