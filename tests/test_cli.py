"""The `eqx-vae` command line, end to end in subprocesses."""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, require, small_config

import eqx_vae
from eqx_vae.interop import write_safetensors


def run(*args, check=True, cwd=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "eqx_vae", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def model():
    config = small_config(block_out_channels=(32, 32), norm_num_groups=32, scaling_factor=0.13025)
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def _same(a, b, rtol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(np.abs(y).max()))


@pytest.mark.slow
def test_convert_round_trip_through_every_kind(model, tmp_path):
    eqx_vae.save(tmp_path / "a.eqx", model)
    out = run("convert", tmp_path / "a.eqx", tmp_path / "folder").stdout
    assert "(eqx) ->" in out and "(diffusers)" in out
    run("convert", tmp_path / "folder", tmp_path / "single.safetensors")
    # A single file does not carry the latent scaling: the config must come from elsewhere.
    result = run("convert", tmp_path / "single.safetensors", tmp_path / "b.eqx", check=False)
    assert result.returncode == 1 and "preset" in result.stderr
    loaded = eqx_vae.load_single_file(tmp_path / "single.safetensors", config=model.config)
    _same(model, loaded)
    _same(model, eqx_vae.load_diffusers(tmp_path / "folder"))


@pytest.mark.slow
def test_convert_dtype_and_variant(model, tmp_path):
    eqx_vae.save(tmp_path / "a.eqx", model)
    run(
        "convert", tmp_path / "a.eqx", tmp_path / "half", "--dtype", "float16", "--variant", "fp16"
    )
    assert (tmp_path / "half" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = eqx_vae.load_diffusers(tmp_path / "half", variant="fp16", dtype="float16")
    _same(model, half, rtol=1e-3)
    run(
        "convert",
        tmp_path / "half",
        tmp_path / "b.eqx",
        "--variant",
        "fp16",
        "--dtype",
        "bfloat16",
    )
    assert eqx_vae.load(tmp_path / "b.eqx").encoder.conv_in.weight.dtype == "bfloat16"


@pytest.mark.slow
def test_convert_errors(tmp_path):
    result = run("convert", tmp_path / "missing.eqx", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert "eqx-vae convert: error:" in result.stderr and "does not exist" in result.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    result = run(
        "convert", tmp_path / "junk.safetensors", tmp_path / "out", "--preset", "sd15", check=False
    )
    assert result.returncode == 1 and "safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("convert", tmp_path / "junk.safetensors", tmp_path / "out.txt", check=False)
    assert result.returncode == 1
    (tmp_path / "junk.eqx").write_text("a text file, renamed")
    result = run("convert", tmp_path / "junk.eqx", tmp_path / "out", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "junk.eqx is not an eqx_vae checkpoint (it does not start with" in result.stderr
    result = run("convert", check=False)
    assert result.returncode == 2 and "usage" in result.stderr


def test_convert_keeps_the_stored_dtype(model, tmp_path, capsys):
    from eqx_vae.cli import main

    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), model)
    eqx_vae.save_diffusers(tmp_path / "half", half)
    assert main(["convert", str(tmp_path / "half"), str(tmp_path / "half.eqx")]) == 0
    assert "float16" in capsys.readouterr().out
    _same(half, eqx_vae.load(tmp_path / "half.eqx"))
    assert eqx_vae.load(tmp_path / "half.eqx").encoder.conv_in.weight.dtype == jnp.float16
    assert main(["convert", str(tmp_path / "half.eqx"), str(tmp_path / "half.safetensors")]) == 0
    with eqx_vae.interop.SafetensorsFile(tmp_path / "half.safetensors") as f:
        assert {ref.dtype for ref in f.values()} == {np.dtype(np.float16)}
    # Back to a folder, from the single file (whose scaling the config gives), still float16.
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    arguments = ["convert", str(tmp_path / "half.safetensors"), str(tmp_path / "again")]
    assert main([*arguments, "--config", str(tmp_path / "config.json")]) == 0
    again = eqx_vae.load_diffusers(tmp_path / "again", dtype=jnp.float16)
    assert again.config == model.config
    _same(half, again)
    with eqx_vae.interop.SafetensorsFile(
        tmp_path / "again" / "diffusion_pytorch_model.safetensors"
    ) as f:
        assert {ref.dtype for ref in f.values()} == {np.dtype(np.float16)}
    # --dtype still says otherwise.
    assert (
        main(["convert", str(tmp_path / "half"), str(tmp_path / "f32.eqx"), "--dtype", "float32"])
        == 0
    )
    assert eqx_vae.load(tmp_path / "f32.eqx").encoder.conv_in.weight.dtype == jnp.float32
    capsys.readouterr()
    # --config is for single files; a folder has its own.
    code = main(
        [
            "convert",
            str(tmp_path / "half"),
            str(tmp_path / "x.eqx"),
            "--config",
            str(tmp_path / "config.json"),
        ]
    )
    assert code == 1 and "A config is for single files" in capsys.readouterr().err


def test_convert_builtin_and_flax_folders_keep_float16(tmp_path):
    from eqx_vae.cli import main

    assert main(["convert", "builtin", str(tmp_path / "b.eqx")]) == 0
    assert eqx_vae.load(tmp_path / "b.eqx").encoder.conv_in.weight.dtype == jnp.float16
    require("msgpack")
    flax_folder = FIXTURES / "flax_msgpack"  # written by FlaxAutoencoderKL, float16
    assert main(["convert", str(flax_folder), str(tmp_path / "f.eqx")]) == 0
    converted = eqx_vae.load(tmp_path / "f.eqx")
    assert converted.encoder.conv_in.weight.dtype == jnp.float16
    _same(eqx_vae.load_diffusers(flax_folder, dtype=jnp.float16), converted)


def test_model_files_are_told_apart_by_their_contents(model, tmp_path):
    from eqx_vae import CheckpointError
    from eqx_vae.cli._convert import load_any

    (tmp_path / "random.eqx").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "text.eqx").write_text("a text file, renamed")
    (tmp_path / "empty.eqx").write_bytes(b"")
    for name in ["random.eqx", "text.eqx", "empty.eqx"]:
        with pytest.raises(CheckpointError) as info:
            load_any(tmp_path / name)
        message = str(info.value)
        assert f"{name} is not an eqx_vae checkpoint (it does not start with" in message
        assert "is not a safetensors file" not in message
    (tmp_path / "random.weights").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError, match=r"random\.weights is not a model file"):
        load_any(tmp_path / "random.weights")
    # Files under another kind's name are read as what they hold.
    eqx_vae.save(tmp_path / "eqx.safetensors", model)
    _same(model, load_any(tmp_path / "eqx.safetensors")[0])
    eqx_vae.save_single_file(tmp_path / "single.eqx", model)
    with pytest.raises(CheckpointError, match=r"single\.eqx holds only an autoencoder"):
        load_any(tmp_path / "single.eqx")  # read as a single file, which needs a preset


def test_torch_checkpoints_are_told_apart_by_their_contents(model, tmp_path):
    torch = require("torch")
    from eqx_vae.cli._convert import load_any
    from eqx_vae.interop import SafetensorsFile

    eqx_vae.save_single_file(tmp_path / "single.safetensors", model)
    with SafetensorsFile(tmp_path / "single.safetensors") as f:
        state_dict = {name: torch.from_numpy(ref.read()) for name, ref in f.items()}
    torch.save(state_dict, tmp_path / "weights.data")
    loaded = eqx_vae.load_single_file(tmp_path / "weights.data", config=model.config)
    _same(model, loaded)
    with pytest.raises(eqx_vae.CheckpointError, match=r"weights\.data holds only an autoencoder"):
        load_any(tmp_path / "weights.data")


# --- reconstruct, encode, decode, info, train ---


def _photo(path, height=36, width=42):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [127 + 120 * np.sin(x / 5.0), 127 + 120 * np.cos(y / 4.0), (x * y) % 255], axis=-1
    )
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def _read(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1


def _expected(rgb_rows):
    """`(3, H, W)` in `[-1, 1]` from rows of 8-bit RGB triples."""
    return np.transpose(np.asarray(rgb_rows, np.float32), (2, 0, 1)) / 127.5 - 1


def test_transparent_images_are_composited_on_white(tmp_path):
    from PIL import Image

    from eqx_vae._images import read_image

    # Opaque red; transparent black; black at alpha 0.4, which over white is 60% white.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 102]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    expected = _expected([[[255, 0, 0], [255, 255, 255], [153, 153, 153]]])
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), expected, atol=1e-6)
    la = np.array([[[0, 0], [50, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    expected = _expected([[[255, 255, 255], [50, 50, 50]]])
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), expected, atol=1e-6)
    # A palette image whose entry 0 (black) is transparent.
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.save(tmp_path / "palette.png", transparency=0)
    expected = _expected([[[255, 255, 255], [10, 200, 30]]])
    np.testing.assert_allclose(read_image(tmp_path / "palette.png"), expected, atol=1e-6)


def test_grayscale_images_become_three_equal_channels(tmp_path):
    from PIL import Image

    from eqx_vae._images import read_image

    Image.fromarray(np.array([[0, 128, 255]], np.uint8), "L").save(tmp_path / "gray.png")
    expected = _expected([[[0, 0, 0], [128, 128, 128], [255, 255, 255]]])
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png"), expected)


@pytest.mark.slow
def test_reconstruct_with_the_built_in_model_on_the_sample_photograph(tmp_path):
    """The README's main command: no arguments but the output."""
    out = run("reconstruct", "--compare", cwd=tmp_path).stdout
    assert "built-in" in out and "chelsea.png" in out
    psnr = float(out.split("PSNR ")[1].split(" dB")[0])
    ssim = float(out.split("SSIM ")[1].split(" ")[0])
    bicubic = float(out.split("values: PSNR ")[1].split(" dB")[0])
    # The shipped model's quality as the README reports it (30.2 dB, SSIM 0.82 on this
    # held-out photograph), guarding against a damaged or mis-loaded model.
    assert psnr > 30.0 and ssim > 0.81, out
    assert abs(bicubic - 30.8) < 0.2, out
    side_by_side = _read(tmp_path / "reconstruction.png")
    assert side_by_side.shape == (3, 300, 2 * 451)


@pytest.mark.slow
def test_reconstruct_matches_the_library(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    image = _photo(tmp_path / "in.png", 35, 41)  # not multiples of the spatial factor, 2
    out = run("reconstruct", image, tmp_path / "out.png", "--model", tmp_path / "m.eqx").stdout
    x = _read(image)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1)), mode="edge")  # edges repeated to 36 x 42
    expected = np.clip(np.asarray(model(jax.numpy.asarray(padded)))[:, :35, :41], -1, 1)
    got = _read(tmp_path / "out.png")
    assert got.shape == x.shape
    assert np.max(np.abs(got - expected)) <= 1.5 / 127.5  # 8-bit rounding
    reported = float(out.split("PSNR ")[1].split(" dB")[0])
    psnr = eqx_vae.metrics.psnr(jax.numpy.asarray(x), jax.numpy.asarray(expected))
    assert abs(reported - float(psnr)) < 0.01
    # Tiled, the same image.
    run(
        "reconstruct", image, tmp_path / "tiled.png", "--model", tmp_path / "m.eqx", "--tile", "16"
    )
    assert np.max(np.abs(_read(tmp_path / "tiled.png") - got)) <= 1.5 / 127.5


@pytest.mark.slow
def test_reconstruct_a_folder(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    (tmp_path / "in").mkdir()
    for i in range(3):
        _photo(tmp_path / "in" / f"{i}.jpg", 24 + 4 * i, 32)
    result = run("reconstruct", tmp_path / "in", tmp_path / "out", "--model", tmp_path / "m.eqx")
    assert "3 images: mean PSNR" in result.stdout
    # Three sizes, one bucket: an encoder and a decoder compiled, once each.
    assert "; 2 programs compiled" in result.stdout
    assert "reconstructing" in result.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "2.png"]


@pytest.mark.slow
def test_a_folder_goes_on_past_unreadable_files_and_lists_them(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    m = ("--model", tmp_path / "m.eqx")
    (tmp_path / "in").mkdir()
    for i in (0, 2, 4):
        _photo(tmp_path / "in" / f"{i}.png", 24, 32)
    (tmp_path / "in" / "1.png").write_text("not an image")
    (tmp_path / "in" / "3.jpg").write_bytes(b"")
    result = run("reconstruct", tmp_path / "in", tmp_path / "out", *m, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "2.png", "4.png"]
    assert "3 images: mean PSNR" in result.stdout
    lines = result.stderr.splitlines()
    at = lines.index("eqx-vae reconstruct: error: 2 of 5 images failed:")
    assert lines[at + 1].startswith(f"  {tmp_path / 'in' / '1.png'}: Cannot read the image")
    assert lines[at + 2].startswith(f"  {tmp_path / 'in' / '3.jpg'}: Cannot read the image")
    # Encoding, and decoding a folder with a file that holds no latent.
    result = run("encode", tmp_path / "in", tmp_path / "z", *m, check=False)
    assert result.returncode == 1 and "2 of 5 images failed" in result.stderr
    assert len(list((tmp_path / "z").iterdir())) == 3
    (tmp_path / "z" / "junk.safetensors").write_bytes(b"junk")
    result = run("decode", tmp_path / "z", tmp_path / "back", *m, check=False)
    assert result.returncode == 1 and "1 of 4 latents failed" in result.stderr
    assert "junk.safetensors: " in result.stderr
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["0.png", "2.png", "4.png"]


@pytest.mark.slow
def test_encode_then_decode(model, tmp_path):
    from eqx_vae.interop._safetensors import SafetensorsFile

    eqx_vae.save(tmp_path / "m.eqx", model)
    image = _photo(tmp_path / "in.png", 32, 40)
    m = ("--model", tmp_path / "m.eqx")
    run("encode", image, tmp_path / "z.safetensors", *m)
    with SafetensorsFile(tmp_path / "z.safetensors") as f:
        z = f["latents"].read()
        assert f.metadata["scaled"] == "true"
    x = jax.numpy.asarray(_read(image))
    expected = model.scale_latents(model.encode(x).mode())
    np.testing.assert_allclose(z[0], expected, rtol=1e-5, atol=1e-5)
    run("decode", tmp_path / "z.safetensors", tmp_path / "back.png", *m)
    run("reconstruct", image, tmp_path / "direct.png", *m)
    assert (
        np.max(np.abs(_read(tmp_path / "back.png") - _read(tmp_path / "direct.png")))
        <= 1.5 / 127.5
    )
    # Raw latents and posterior samples.
    run("encode", image, tmp_path / "raw.safetensors", *m, "--raw", "--sample", "3")
    with SafetensorsFile(tmp_path / "raw.safetensors") as f:
        assert f.metadata["scaled"] == "false"
        raw = f["latents"].read()[0]
    mode = np.asarray(model.encode(x).mode())
    assert not np.allclose(raw, mode) and np.max(np.abs(raw - mode)) < 10
    # A latent of the wrong shape for the model, and a file without latents.
    from eqx_vae.interop._safetensors import write_safetensors

    write_safetensors(tmp_path / "three.safetensors", {"latents": np.zeros((1, 3, 4, 4), "f4")})
    result = run("decode", tmp_path / "three.safetensors", tmp_path / "x.png", *m, check=False)
    assert result.returncode == 1 and "shape (3, 4, 4)" in result.stderr
    eqx_vae.save_single_file(tmp_path / "weights.safetensors", model)
    result = run("decode", tmp_path / "weights.safetensors", tmp_path / "x.png", *m, check=False)
    assert result.returncode == 1 and "no tensor named 'latents'" in result.stderr


@pytest.mark.slow
def test_flux2_latents_are_patchified_and_normalised(tmp_path):
    from eqx_vae.interop._safetensors import SafetensorsFile

    config = small_config(patch_size=(2, 2), decoder_block_out_channels=(8, 16))
    flux2 = eqx_vae.AutoencoderKL(config, key=jax.random.key(3))
    flux2 = eqx.tree_at(lambda m: m.bn.running_var, flux2, jax.numpy.linspace(0.5, 2.0, 16))
    eqx_vae.save(tmp_path / "m.eqx", flux2)
    m = ("--model", tmp_path / "m.eqx")
    image = _photo(tmp_path / "in.png", 30, 22)  # padded to multiples of 4 (2 x 2 patches)
    run("encode", image, tmp_path / "z.safetensors", *m)
    with SafetensorsFile(tmp_path / "z.safetensors") as f:
        z = f["latents"].read()
        assert json.loads(f.metadata["scaling"]) == {"patch_size": [2, 2], "batch_norm_eps": 1e-4}
    assert z.shape == (1, 16, 8, 6)
    padded = np.pad(_read(image), ((0, 0), (0, 2), (0, 2)), mode="edge")
    expected = flux2.scale_latents(flux2.encode(jax.numpy.asarray(padded)).mode())
    np.testing.assert_allclose(z[0], expected, rtol=1e-5, atol=1e-5)
    run("decode", tmp_path / "z.safetensors", tmp_path / "back.png", *m)
    run("reconstruct", image, tmp_path / "direct.png", *m)
    assert (
        np.max(np.abs(_read(tmp_path / "back.png") - _read(tmp_path / "direct.png")))
        <= 1.5 / 127.5
    )
    run("encode", image, tmp_path / "raw.safetensors", *m, "--raw")
    with SafetensorsFile(tmp_path / "raw.safetensors") as f:
        assert f["latents"].shape == (1, 4, 16, 12)
    run("decode", tmp_path / "raw.safetensors", tmp_path / "raw.png", *m)
    # A raw-sized latent that claims to be scaled.
    write_safetensors(tmp_path / "wrong.safetensors", {"latents": np.zeros((1, 4, 8, 6), "f4")})
    result = run("decode", tmp_path / "wrong.safetensors", tmp_path / "x.png", *m, check=False)
    assert result.returncode == 1 and "scaled latents of shape (16, h, w)" in result.stderr
    out = run("info", *m).stdout
    assert "2x2 patches folded into the channels" in out
    # The BatchNorm statistics are not parameters.
    count = sum(x.size for x in jax.tree_util.tree_leaves(flux2))
    assert f"{count - 2 * 16 - 1:,} parameters" in out


@pytest.mark.slow
def test_info(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    out = run("info", "--model", tmp_path / "m.eqx").stdout
    count = sum(x.size for x in jax.tree_util.tree_leaves(model))
    assert f"{count:,} parameters" in out
    assert "latent scaling: z * 0.13025" in out and "spatial factor 2" in out
    out = run("info").stdout
    assert "model: built-in" in out and "spatial factor 4" in out
    assert run("info", "--model", "builtin").stdout == out
    import json

    config = json.loads(run("info", "--model", tmp_path / "m.eqx", "--json").stdout)
    assert config["block_out_channels"] == [32, 32]


@pytest.mark.slow
def test_builtin_names_the_built_in_model_wherever_a_model_is_accepted(tmp_path, capsys):
    import argparse

    from eqx_vae.cli import main
    from eqx_vae.cli._common import load_model

    builtin = eqx_vae.load_builtin()
    _same(builtin, load_model(argparse.Namespace(model="builtin", preset=None)))
    run("convert", "builtin", tmp_path / "builtin.eqx")
    _same(builtin, eqx_vae.load(tmp_path / "builtin.eqx"))
    for command in ["reconstruct", "encode", "decode", "info", "train", "convert"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "builtin for the built-in" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails a test that gets as far as loading a model (or training data)."""
    from eqx_vae.cli import _convert, _latents, _reconstruct, _train

    def refuse(*args, **kwargs):
        raise AssertionError("the arguments were not checked before loading")

    for module in (_reconstruct, _latents, _train):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(_convert, "load_any", refuse)
    monkeypatch.setattr("eqx_vae.train.ImageFolder", refuse)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["reconstruct", "--tile", "0"], "--tile 0: must be a multiple of 2 and at least 8"),
        (["reconstruct", "--tile", "15"], "--tile 15: must be a multiple of 2 and at least 8"),
        (["encode", "in.png", "z.safetensors", "--tile", "-8"], "--tile -8: must be a multiple"),
        (["decode", "in.safetensors", "o.png", "--tile", "6"], "--tile 6: must be a multiple"),
        (["reconstruct", "in.png", "o.unknown"], "OUT o.unknown: cannot write an image"),
        (["reconstruct", "in.png", "o"], "OUT o: an image file needs a suffix"),
        (
            ["decode", "in.safetensors", "o.txt"],
            "OUT o.txt: cannot write an image with the suffix",
        ),
        (["encode", "in.png", "z.safetensors", "--sample", str(2**64)], "--sample 1844674"),
        (["convert", "builtin", "out.txt"], "Cannot tell what to write to out.txt"),
        (["train", "--steps", "0"], "--steps 0: must be at least 1"),
        (["train", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["train", "--crop-size", "-64"], "--crop-size -64: must be at least 1"),
        (["train", "--accumulate", "0"], "--accumulate 0: must be at least 1"),
        (["train", "--sample-every", "0"], "--sample-every 0: must be at least 1"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every 0: must be at least 1"),
        (["train", "--warmup-steps", "-1"], "--warmup-steps -1: must be at least 0"),
        (["train", "--disc-start", "-5"], "--disc-start -5: must be at least 0"),
        (["train", "--learning-rate", "-0.001"], "--learning-rate -0.001: must be at least 0"),
        (["train", "--kl-weight", "-1"], "--kl-weight -1: must be at least 0"),
        (["train", "--scale", "1", "0.5"], "--scale 1 0.5: must be a range 0 < LOW <= HIGH"),
        (["train", "--ema", "1"], "--ema 1: must lie between 0 and 1"),
        (["train", "--devices", "0"], "--devices 0: must be between 1 and"),
        (["train", "--batch-size", "6", "--accumulate", "4"], "--batch-size 6: must be a mult"),
        (["train", "--crop-size", "30"], "--crop-size 30: must be a multiple of the spatial"),
        (["train", "--perceptual-weight", "1"], "--perceptual-weight 1: needs --vgg16"),
        (["train", "--vgg16", "missing.pth"], "--vgg16 missing.pth: does not exist"),
        (["train", "--seed", str(-(2**63) - 1)], "--seed -9223372036854775809: must be a 64"),
        (
            ["train", "--cosine", "--warmup-steps", "10", "--steps", "10"],
            "--steps 10: must be more than --warmup-steps 10",
        ),
    ],
)
def test_arguments_are_checked_before_loading(
    arguments, message, tmp_path, monkeypatch, capsys, no_model_loading
):
    from eqx_vae.cli import main

    monkeypatch.chdir(tmp_path)
    _photo(tmp_path / "in.png")
    (tmp_path / "in.safetensors").write_bytes(b"")
    if arguments[0] == "train":
        arguments = [*arguments, "--data", str(tmp_path)]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"eqx-vae {arguments[0]}: error: ") and message in error, error
    assert len(error.splitlines()) == 1


def test_every_problem_is_reported_at_once(tmp_path, capsys, no_model_loading):
    from eqx_vae.cli import main

    arguments = ["train", "--data", str(tmp_path), "--steps", "0", "--ema", "2"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "--steps 0: must be at least 1; --ema 2: must lie between 0 and 1." in error


def test_the_tile_rule_is_the_tiling_functions_rule():
    from eqx_vae._tiling import check_tile
    from eqx_vae.cli._checks import TILE_MULTIPLE, ArgumentProblems

    for tile in range(-4, 40):
        problems = ArgumentProblems()
        problems.tile(tile)
        try:
            check_tile(tile, TILE_MULTIPLE)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (not problems.problems), tile


@pytest.mark.slow
def test_bad_inputs_fail_clearly(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    m = ("--model", tmp_path / "m.eqx")
    for args, message in [
        (("reconstruct", tmp_path / "missing.png", tmp_path / "o.png", *m), "does not exist"),
        (("encode", tmp_path / "missing.png", tmp_path / "z.safetensors", *m), "does not exist"),
        (("info", "--model", tmp_path / "missing.eqx"), "does not exist"),
    ]:
        result = run(*args, check=False)
        assert result.returncode == 1, result
        assert message in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "text.png").write_text("this is not an image")
    result = run("reconstruct", tmp_path / "text.png", tmp_path / "o.png", *m, check=False)
    assert result.returncode == 1 and "Cannot read the image" in result.stderr
    result = run("reconstruct", *m, "--model", tmp_path / "text.png", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    result = run(
        "reconstruct", _photo(tmp_path / "in.png"), tmp_path / "o.unknown", *m, check=False
    )
    assert result.returncode == 1 and "cannot write an image" in result.stderr


@pytest.mark.slow
def test_train_command(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(3):
        _photo(tmp_path / "data" / f"{i}.png", 40, 48 + 8 * i)
    result = run(
        "train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--new", "builtin",
        "--steps", "4", "--batch-size", "2", "--crop-size", "16", "--learning-rate", "1e-3",
        "--ema", "0.9", "--checkpoint-every", "2", "--sample-every", "2",
        "--scale", "0.5", "1", "--permute-channels", "--checkpointing",
        "--latent-statistics", "2", "--dead-leaves", "0.5",
    )  # fmt: skip
    assert "training" in result.stdout and "wrote" in result.stdout
    assert "50% of the samples are dead-leaves images" in result.stdout
    # A new model: the from-scratch settings fill what is not given.
    assert (
        "a new builtin model, with the from-scratch settings unless given: learning rate "
        "0.001, 2 warm-up steps, cosine decay, Adam betas (0.9, 0.99), EMA 0.9"
    ) in result.stdout
    assert "latent scaling from 4 images: z * " in result.stdout
    trained = eqx_vae.load(tmp_path / "run" / "model.eqx")
    assert trained.spatial_factor == 4
    record = json.loads((tmp_path / "run" / "latent_statistics.json").read_text())
    assert trained.config.scaling_factor == record["conventions"]["scaling"]["scaling_factor"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert lines and '"step": 4' in lines[-1]
    for name in ("checkpoint.eqx", "losses.png", "samples/step_0000004.png"):
        assert (tmp_path / "run" / name).is_file()
    result = run("train", "--data", tmp_path / "nowhere", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run("train", "--data", tmp_path / "data", "--scale", "1", "0.5", check=False)
    assert result.returncode == 1 and "--scale 1 0.5: must be a range" in result.stderr
    result = run("train", "--data", tmp_path / "data", "--dead-leaves", "2", check=False)
    assert result.returncode == 1 and "--dead-leaves 2: must lie in [0, 1]" in result.stderr


def test_train_recipe_defaults():
    """Without --model, training starts from random weights with the from-scratch
    settings; with one, it fine-tunes at the recipe's 4.5e-6; options given win."""
    import argparse

    from eqx_vae.cli import _train

    parser = argparse.ArgumentParser()
    _train.add_parser(parser.add_subparsers())
    parse = lambda *a: parser.parse_args(["train", "--data", "d", *a])  # noqa: E731
    args = parse("--steps", "5000")
    message = _train.resolve_recipe(args)
    config = _train._train_config(args)
    assert config.learning_rate == 2e-3 and config.warmup_steps == 100
    assert config.decay_steps == 5000 and config.betas == (0.9, 0.99)
    assert config.ema_decay == 0.999
    assert message.startswith("a new builtin model, with the from-scratch settings")
    args = parse("--model", "builtin")
    message = _train.resolve_recipe(args)
    config = _train._train_config(args)
    assert config.learning_rate == 4.5e-6 and config.warmup_steps == 0
    assert config.decay_steps is None and config.ema_decay is None
    assert config.betas == (0.5, 0.9)
    assert message.startswith("fine-tuning builtin, with the recipe's settings")
    args = parse("--new", "sd15", "--learning-rate", "1e-4", "--no-cosine", "--warmup-steps", "7")
    _train.resolve_recipe(args)
    config = _train._train_config(args)
    assert config.learning_rate == 1e-4 and config.decay_steps is None
    assert config.warmup_steps == 7
    assert config.colour_weight == 0.0 and config.colour_block == 8
    args = parse("--colour-weight", "4", "--colour-block", "16")
    _train.resolve_recipe(args)
    config = _train._train_config(args)
    assert config.colour_weight == 4.0 and config.colour_block == 16


@pytest.mark.slow
def test_stats_command(tmp_path):
    from eqx_vae._images import read_image, resize

    (tmp_path / "data").mkdir()
    for i in range(3):
        _photo(tmp_path / "data" / f"{i}.png", 40, 48 + 8 * i)
    result = run(
        "stats", "--data", tmp_path / "data", "--size", "32", "--batch", "2",
        "--convention", "per_channel", "--out", tmp_path / "scaled.eqx",
    )  # fmt: skip
    assert "3 images at 32 px" in result.stdout and "latents_mean" in result.stdout
    assert f"wrote {tmp_path / 'scaled.eqx'}" in result.stdout
    scaled = eqx_vae.load(tmp_path / "scaled.eqx")
    # The library on the same centre crops gives the same statistics.
    crops = []
    for path in sorted((tmp_path / "data").iterdir()):
        image = read_image(path)
        left = (image.shape[2] - 40) // 2
        crops.append(resize(image[:, :, left : left + 40], 32))
    builtin = eqx_vae.load_builtin()
    stats = eqx_vae.latent_statistics(builtin, [np.stack(crops)])
    assert scaled.config.latents_mean is not None and scaled.config.latents_std is not None
    np.testing.assert_allclose(scaled.config.latents_mean, stats.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled.config.latents_std, stats.std, rtol=1e-5)
    _same(builtin, scaled)
    result = run("stats", "--data", tmp_path / "data", "--size", "30", check=False)
    assert result.returncode == 1 and "multiple of the model's spatial factor 4" in result.stderr
    result = run("stats", "--data", tmp_path / "nowhere", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
