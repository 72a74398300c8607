"""The `eqx-vae` command line, end to end in subprocesses."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import small_config

import eqx_vae


def run(*args, check=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "eqx_vae", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
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
    result = run("convert", check=False)
    assert result.returncode == 2 and "usage" in result.stderr
