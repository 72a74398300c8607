"""diffusers model folders, both ways, against diffusers itself."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, require_torch, small_config
from parity_cases import CASES, diffusers_model, inputs, torch_outputs

import eqx_vae
from eqx_vae import CheckpointError


CASE = next(c for c in CASES if c.name == "sd_shaped")


def _ours(model: eqx_vae.AutoencoderKL, image, latent) -> dict[str, np.ndarray]:
    posterior = model.encode(jnp.asarray(image))
    return {
        "mean": np.asarray(posterior.mean),
        "logvar": np.asarray(posterior.logvar),
        "decoded": np.asarray(model.decode(jnp.asarray(latent))),
        "reconstruction": np.asarray(model(jnp.asarray(image))),
    }


def _assert_same_outputs(ours: eqx_vae.AutoencoderKL, theirs, rtol=1e-4):
    image, latent = inputs(CASE, 0)
    expected = torch_outputs(theirs, image, latent)
    for name, value in _ours(ours, image, latent).items():
        assert_close(value, expected[name], rtol=rtol, what=name)


@pytest.fixture(scope="module")
def torch_model():
    require_torch()
    return diffusers_model(CASE.config, seed=3)


@pytest.mark.slow
@pytest.mark.torch
def test_loads_save_pretrained_float32(torch_model, tmp_path):
    torch_model.save_pretrained(tmp_path)
    _assert_same_outputs(eqx_vae.load_diffusers(tmp_path), torch_model)


@pytest.mark.torch
def test_loads_fp16_variant(torch_model, tmp_path):
    torch, diffusers = require_torch()
    torch_model.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    torch_model.to(torch.float32)
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"has no diffusion_pytorch_model\.safetensors"):
        eqx_vae.load_diffusers(tmp_path)
    reference = diffusers.AutoencoderKL.from_pretrained(
        tmp_path, variant="fp16", torch_dtype=torch.float32
    )
    ours = eqx_vae.load_diffusers(tmp_path, variant="fp16")
    assert ours.encoder.conv_in.weight.dtype == jnp.float32
    _assert_same_outputs(ours, reference)
    half = eqx_vae.load_diffusers(tmp_path, variant="fp16", dtype=jnp.float16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.float16)}


@pytest.mark.torch
def test_loads_sharded_checkpoint(torch_model, tmp_path):
    torch_model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (
        len(shards) > 3 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    )
    _assert_same_outputs(eqx_vae.load_diffusers(tmp_path), torch_model)


@pytest.mark.torch
def test_loads_pipeline_folder(torch_model, tmp_path):
    torch_model.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _assert_same_outputs(eqx_vae.load_diffusers(tmp_path), torch_model)
    _assert_same_outputs(eqx_vae.from_pretrained(tmp_path), torch_model)


@pytest.mark.torch
def test_loads_pickled_bin(torch_model, tmp_path):
    require_torch()
    torch_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    _assert_same_outputs(eqx_vae.load_diffusers(tmp_path), torch_model)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_save_diffusers_loads_in_diffusers(torch_model, tmp_path, variant):
    torch, diffusers = require_torch()
    torch_model.save_pretrained(tmp_path / "src")
    ours = eqx_vae.load_diffusers(tmp_path / "src")
    dtype = None if variant is None else jnp.float16
    eqx_vae.save_diffusers(tmp_path / "dst", ours, dtype=dtype, variant=variant)
    theirs, info = diffusers.AutoencoderKL.from_pretrained(
        tmp_path / "dst", variant=variant, torch_dtype=torch.float32, output_loading_info=True
    )
    assert info == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert eqx_vae.AutoencoderKLConfig.from_dict(dict(theirs.config)) == ours.config
    if variant is None:
        _assert_same_outputs(ours, theirs)
        for name, value in theirs.state_dict().items():
            expected = eqx_vae.to_diffusers_state_dict(ours)[name]
            np.testing.assert_array_equal(value.numpy(), expected)
    else:
        _assert_same_outputs(eqx_vae.load_diffusers(tmp_path / "dst", variant="fp16"), theirs)


def test_save_then_load_is_bit_exact(tmp_path):
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    eqx_vae.save_diffusers(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and "_diffusers_version" in config
    again = eqx_vae.load_diffusers(tmp_path)
    for a, b in zip(
        jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    half = eqx_vae.load_diffusers(tmp_path, dtype=jnp.bfloat16)
    assert half.decoder.conv_out.weight.dtype == jnp.bfloat16


def test_save_diffusers_takes_the_path_first(tmp_path):
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    eqx_vae.save_diffusers(tmp_path / "new", model)  # warnings are errors: none here
    eqx_vae.save_diffusers(path=tmp_path / "keywords", model=model)
    expected = {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir()}
    message = r"`eqx_vae\.save_diffusers\(model, path, \.\.\.\)` is deprecated.*\(path, model"
    # The old order, model first, for one release.
    with pytest.warns(DeprecationWarning, match=message) as warned:
        eqx_vae.save_diffusers(model, tmp_path / "old")  # pyright: ignore[reportArgumentType, reportCallIssue]
    assert warned[0].filename == __file__  # points at the caller
    with pytest.warns(DeprecationWarning, match=message):
        eqx_vae.save_diffusers(model, path=tmp_path / "old-keyword", variant="v")  # pyright: ignore[reportArgumentType, reportCallIssue]
    for folder in ("keywords", "old"):
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()} == expected
    variant = tmp_path / "old-keyword" / "diffusion_pytorch_model.v.safetensors"
    assert variant.read_bytes() == expected["diffusion_pytorch_model.safetensors"]


def test_config_that_does_not_match_the_weights(tmp_path):
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    eqx_vae.save_diffusers(tmp_path, model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_per_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        eqx_vae.load_diffusers(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "layers_per_block=2" in message
    assert "encoder.down_blocks.0.resnets.1.conv1.weight" in message


def test_invalid_config_json(tmp_path):
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    eqx_vae.save_diffusers(tmp_path, model)
    (tmp_path / "config.json").write_text('{"act_fn": "gelu"}')
    with pytest.raises(
        CheckpointError, match=r"config\.json is not a valid AutoencoderKL config.*gelu"
    ):
        eqx_vae.load_diffusers(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Cannot read .*config\.json"):
        eqx_vae.load_diffusers(tmp_path)


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        eqx_vae.load_diffusers(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"has no config\.json or in its 'vae' subfolder"):
        eqx_vae.load_diffusers(tmp_path)
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    eqx_vae.save_diffusers(tmp_path, model)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no diffusion_pytorch_model\.safetensors"):
        eqx_vae.load_diffusers(tmp_path)


def test_non_finite_weights_refused_on_request(tmp_path):
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    bad = eqx_vae.from_diffusers_state_dict(
        {
            **eqx_vae.to_diffusers_state_dict(model),
            "decoder.conv_out.bias": np.array([np.nan, 0.0, np.inf], np.float32),
        },
        model.config,
    )
    eqx_vae.save_diffusers(tmp_path, bad)
    eqx_vae.load_diffusers(tmp_path)  # not checked by default
    with pytest.raises(
        CheckpointError, match=r"decoder\.conv_out\.bias: 2 of 3 values are NaN or infinite"
    ):
        eqx_vae.load_diffusers(tmp_path, check_finite=True)


@pytest.mark.torch
def test_broken_shard_index(tmp_path):
    require_torch()
    model = diffusers_model(CASE.config, seed=1)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(tmp_path / first, tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=f"names the shard '{first}', which is missing"):
        eqx_vae.load_diffusers(tmp_path)
    shutil.move(tmp_path / "elsewhere.safetensors", tmp_path / first)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = sorted(set(index["weight_map"].values()))[-1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="places in"):
        eqx_vae.load_diffusers(tmp_path)
