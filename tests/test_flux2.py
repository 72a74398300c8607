"""FLUX.2's autoencoder: the BatchNorm statistics the model carries, the latent
normalisation they define, the files they travel in, and a decoder narrower than the
encoder (in any family)."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, require_torch, small_config
from parity_cases import CASES, diffusers_model, flux2_pipeline_outputs, inputs, torch_outputs

import eqx_vae
from eqx_vae import CheckpointError
from eqx_vae._state_dict import named_parameters
from eqx_vae.interop import SafetensorsFile, write_safetensors


CASE = next(c for c in CASES if c.name == "flux2_narrow_decoder")


def _config(**overrides) -> eqx_vae.AutoencoderKLConfig:
    """A two-level FLUX.2 model whose decoder's inner level is half as wide as the
    encoder's (widths that 32 groups divide, as in every published model, so that a
    single file's architecture can be inferred)."""
    return small_config(
        block_out_channels=(32, 64),
        decoder_block_out_channels=(32, 32),
        norm_num_groups=32,
        patch_size=(2, 2),
        latent_channels=4,
        **overrides,
    )


def _with_statistics(model: eqx_vae.AutoencoderKL, seed: int = 0) -> eqx_vae.AutoencoderKL:
    assert model.bn is not None
    rng = np.random.default_rng(seed)
    c = model.bn.channels
    stats = (
        jnp.asarray(rng.standard_normal(c), jnp.float32),
        jnp.asarray(np.exp(rng.standard_normal(c)), jnp.float32),
        jnp.asarray(1234, jnp.int32),
    )
    return eqx.tree_at(
        lambda m: (m.bn.running_mean, m.bn.running_var, m.bn.num_batches_tracked), model, stats
    )


@pytest.fixture(scope="module")
def model():
    return _with_statistics(eqx_vae.AutoencoderKL(_config(), key=jax.random.key(0)))


def _statistics(model) -> list[np.ndarray]:
    bn = model.bn
    return [np.asarray(a) for a in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]


def _assert_same_statistics(a, b):
    for x, y in zip(_statistics(a), _statistics(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_only_flux2_models_carry_statistics(model):
    assert isinstance(model.bn, eqx_vae.LatentBatchNorm)
    assert model.bn.running_mean.shape == model.bn.running_var.shape == (16,)
    assert model.bn.num_batches_tracked.dtype == jnp.int32 and model.bn.eps == 1e-4
    names = [name for name, _ in named_parameters(model)]
    assert names[-3:] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert model.encoder.conv_out.weight.shape == (8, 64, 3, 3)
    assert model.decoder.conv_in.weight.shape == (32, 4, 3, 3)  # the narrower decoder
    plain = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    assert plain.bn is None
    assert not any(name.startswith("bn.") for name, _ in named_parameters(plain))
    fresh = eqx_vae.AutoencoderKL(_config(), key=jax.random.key(0))
    assert fresh.bn is not None
    np.testing.assert_array_equal(fresh.bn.running_mean, np.zeros(16))
    np.testing.assert_array_equal(fresh.bn.running_var, np.ones(16))


def test_scale_latents_folds_patches_in_the_pipeline_order(model):
    z = np.random.default_rng(1).standard_normal((4, 6, 10)).astype(np.float32)
    scaled = np.asarray(model.scale_latents(jnp.asarray(z)))
    assert scaled.shape == (16, 3, 5)
    mean, var, _ = _statistics(model)
    std = np.sqrt(var.astype(np.float64) + 1e-4)
    expected = np.empty((16, 3, 5))
    for c in range(4):
        for dy in range(2):
            for dx in range(2):
                k = 4 * c + 2 * dy + dx
                expected[k] = (z[c, dy::2, dx::2] - mean[k]) / std[k]
    assert_close(scaled, expected, rtol=1e-6)
    assert_close(model.unscale_latents(jnp.asarray(scaled)), z, rtol=1e-6)


def test_scale_latents_of_a_batch(model):
    z = jax.random.normal(jax.random.key(2), (2, 3, 4, 6, 10))
    scaled = model.scale_latents(z)
    assert scaled.shape == (2, 3, 16, 3, 5)
    assert_close(scaled[1, 2], model.scale_latents(z[1, 2]), rtol=0)
    assert_close(model.unscale_latents(scaled), z, rtol=1e-6)
    # In half precision the result keeps the input's dtype (computed in float32).
    half = model.scale_latents(z.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    assert_close(half, scaled, rtol=1e-2)


def test_scale_latents_refuses_odd_latents(model, without_typechecks):
    with pytest.raises(ValueError, match=r"multiples of 2 and 2, got 5x10.*pad the image"):
        model.scale_latents(jnp.zeros((4, 5, 10)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 16, h, w\) \(the scaled latent: 4 "):
        model.unscale_latents(jnp.zeros((6, 3, 5)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, h, w\) \(the raw latent\)"):
        model.scale_latents(jnp.zeros((16, 4, 4)))


def test_statistics_take_no_gradient(model):
    z = jax.random.normal(jax.random.key(3), (4, 6, 10))
    grads = eqx.filter_grad(lambda m: jnp.sum(m.scale_latents(z) ** 2))(model)
    np.testing.assert_array_equal(grads.bn.running_mean, 0)
    np.testing.assert_array_equal(grads.bn.running_var, 0)


@pytest.mark.slow
def test_statistics_survive_every_format(model, tmp_path):
    eqx_vae.save(tmp_path / "m.eqx", model)
    again = eqx_vae.load(tmp_path / "m.eqx")
    assert again.config == model.config
    _assert_same_statistics(again, model)

    eqx_vae.save_diffusers(tmp_path / "folder", model, dtype=jnp.float16)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["patch_size"] == [2, 2]
    assert config["decoder_block_out_channels"] == [32, 32]
    assert "scaling_factor" not in config and "force_upcast" not in config
    with SafetensorsFile(tmp_path / "folder" / "diffusion_pytorch_model.safetensors") as f:
        assert f["bn.num_batches_tracked"].read().dtype == np.int64
        assert f["bn.running_var"].read().dtype == np.float16
    half = eqx_vae.load_diffusers(tmp_path / "folder")
    assert half.config == model.config
    assert half.bn is not None and half.bn.num_batches_tracked == 1234
    assert_close(half.bn.running_var, model.bn.running_var, rtol=1e-3)
    eqx_vae.save_diffusers(tmp_path / "exact", model)
    _assert_same_statistics(eqx_vae.load_diffusers(tmp_path / "exact"), model)

    eqx_vae.save_single_file(tmp_path / "ae.safetensors", model)
    # FLUX.2's file holds its latent normalisation: no preset needed.
    single = eqx_vae.load_single_file(tmp_path / "ae.safetensors")
    assert single.config == model.config.replace(sample_size=1024)
    _assert_same_statistics(single, model)
    x = jax.random.uniform(jax.random.key(4), (3, 8, 12), minval=-1, maxval=1)
    assert_close(single(x), model(x), rtol=0)


def test_original_single_file_layout(model, tmp_path):
    """The names of FLUX.2's original `ae.safetensors`: LDM names, the quant convs
    inside the encoder and decoder, the BatchNorm under `bn.`."""
    eqx_vae.save_single_file(tmp_path / "ae.safetensors", model, dtype=jnp.bfloat16)
    with SafetensorsFile(tmp_path / "ae.safetensors") as f:
        names = set(f)
        assert f["bn.num_batches_tracked"].read().dtype == np.int64
        assert f["encoder.quant_conv.weight"].shape == (8, 8, 1, 1)
    for name in (
        "encoder.quant_conv.bias",
        "decoder.post_quant_conv.weight",
        "bn.running_mean",
        "bn.running_var",
        "encoder.down.0.block.0.conv1.weight",
        "decoder.up.1.upsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
    ):
        assert name in names, name
    assert not {"quant_conv.weight", "post_quant_conv.weight"} & names
    # Without the batch count, as in a file converted by hand: it reads as 0.
    with SafetensorsFile(tmp_path / "ae.safetensors") as f:
        tensors = {n: f[n].read() for n in f if n != "bn.num_batches_tracked"}
    write_safetensors(tmp_path / "bare.safetensors", tensors)
    bare = eqx_vae.load_single_file(tmp_path / "bare.safetensors")
    assert bare.bn is not None and bare.bn.num_batches_tracked == 0
    # The same weights under diffusers' names, with the quant convs outside.
    named = {k: np.asarray(v) for k, v in eqx_vae.to_diffusers_state_dict(model).items()}
    write_safetensors(tmp_path / "diffusers_named.safetensors", named)
    named_file = eqx_vae.load_single_file(tmp_path / "diffusers_named.safetensors")
    _assert_same_statistics(named_file, model)
    # Both names of a quant conv at once are refused.
    twice = {**tensors, "quant_conv.weight": tensors["encoder.quant_conv.weight"]}
    write_safetensors(tmp_path / "twice.safetensors", twice)
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight twice"):
        eqx_vae.load_single_file(tmp_path / "twice.safetensors")


def test_single_file_presets_must_match(model, tmp_path):
    eqx_vae.save_single_file(tmp_path / "ae.safetensors", model)
    with pytest.raises(CheckpointError, match=r"'flux2' architecture.*decoder_block_out_channels"):
        eqx_vae.load_single_file(tmp_path / "ae.safetensors", preset="flux2")
    with pytest.raises(CheckpointError, match=r"patch_size: file \(2, 2\), preset None"):
        eqx_vae.load_single_file(tmp_path / "ae.safetensors", preset="sd15")
    loaded = eqx_vae.load_single_file(tmp_path / "ae.safetensors", config=model.config)
    assert loaded.config == model.config


def test_batch_count_is_optional_and_an_integer(model):
    state_dict = eqx_vae.to_diffusers_state_dict(model)
    assert state_dict["bn.num_batches_tracked"].dtype == np.int64
    del state_dict["bn.num_batches_tracked"]
    loaded = eqx_vae.from_diffusers_state_dict(state_dict, model.config, dtype=jnp.bfloat16)
    assert loaded.bn is not None and loaded.bn.num_batches_tracked == 0
    assert loaded.bn.num_batches_tracked.dtype == jnp.int32
    assert loaded.bn.running_var.dtype == jnp.bfloat16
    state_dict["bn.num_batches_tracked"] = np.array(3.0, np.float32)
    state_dict["bn.running_mean"] = np.zeros(16, np.int64)
    with pytest.raises(CheckpointError) as info:
        eqx_vae.from_diffusers_state_dict(state_dict, model.config)
    message = str(info.value)
    assert "bn.num_batches_tracked: dtype float32 is not an integer dtype" in message
    assert "bn.running_mean: dtype int64 is not floating point" in message
    assert "patch_size=(2, 2)" in message and "decoder_block_out_channels=(32, 32)" in message
    state_dict["bn.num_batches_tracked"] = np.array(2**40, np.int64)
    state_dict["bn.running_mean"] = np.zeros(16, np.float32)
    with pytest.raises(CheckpointError, match="do not fit in int32"):
        eqx_vae.from_diffusers_state_dict(state_dict, model.config)


@pytest.mark.slow
def test_narrower_decoder_in_another_family(tmp_path):
    config = small_config(
        block_out_channels=(32, 64),
        decoder_block_out_channels=(32, 32),
        norm_num_groups=32,
        scaling_factor=0.5,
    )
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(5))
    assert model.bn is None and config.to_dict()["decoder_block_out_channels"] == [32, 32]
    z = jax.random.normal(jax.random.key(6), (4, 6, 5))
    assert model.decode(z).shape == (3, 12, 10)
    state_dict = eqx_vae.to_diffusers_state_dict(model)
    assert state_dict["decoder.conv_in.weight"].shape == (32, 4, 3, 3)
    again = eqx_vae.from_diffusers_state_dict(state_dict, config.to_dict())
    assert_close(again.decode(z), model.decode(z), rtol=0)
    eqx_vae.save(tmp_path / "m.eqx", model)
    assert_close(eqx_vae.load(tmp_path / "m.eqx").decode(z), model.decode(z), rtol=0)
    eqx_vae.save_single_file(tmp_path / "vae.safetensors", model)
    single = eqx_vae.load_single_file(tmp_path / "vae.safetensors", config=config)
    assert_close(single.decode(z), model.decode(z), rtol=0)
    # The decoder's widths are read off the file, and must match a preset's.
    with pytest.raises(CheckpointError, match=r"decoder_block_out_channels: file \(32, 32\)"):
        eqx_vae.load_single_file(tmp_path / "vae.safetensors", preset="sd15")
    with pytest.raises(ValueError, match="AutoencoderKL has no `decoder_block_out_channels`"):
        eqx_vae.save_diffusers(tmp_path / "folder", model)
    assert not (tmp_path / "folder").exists()


@pytest.mark.slow
def test_narrower_decoder_tiled_and_sharded(model):
    z = jax.random.normal(jax.random.key(7), (4, 16, 12))
    whole = eqx.filter_jit(model.decode)(z)
    tiled = eqx.filter_jit(eqx_vae.tiled_decode)(model, z, tile_size=8)
    assert_close(tiled, whole, rtol=1e-5, what="tiled decode")
    x = jnp.clip(whole, -1, 1)
    posterior = eqx.filter_jit(model.encode)(x)
    tiled_posterior = eqx.filter_jit(eqx_vae.tiled_encode)(model, x, tile_size=8)
    assert_close(tiled_posterior.mean, posterior.mean, rtol=1e-5, what="tiled encode")
    mesh = jax.make_mesh((2,), ("rows",), devices=jax.devices()[:2])
    sharded = eqx.filter_jit(eqx_vae.sharded_decode)(model, z, mesh, "rows")
    assert_close(sharded, whole, rtol=1e-5, what="sharded decode")


# --- against diffusers' AutoencoderKLFlux2 and the FLUX.2 pipeline ---


def _ours(model, image, latent, scaled_latent) -> dict[str, np.ndarray]:
    posterior = model.encode(jnp.asarray(image))
    return {
        "mean": np.asarray(posterior.mean),
        "logvar": np.asarray(posterior.logvar),
        "decoded": np.asarray(model.decode(jnp.asarray(latent))),
        "reconstruction": np.asarray(model(jnp.asarray(image))),
        "scaled": np.asarray(model.scale_latents(posterior.mode())),
        "unscaled": np.asarray(model.unscale_latents(jnp.asarray(scaled_latent))),
    }


def _assert_same_outputs(ours, theirs):
    image, latent = inputs(CASE, 0)
    c, h, w = latent.shape
    scaled_latent = np.random.default_rng(9).standard_normal((4 * c, h // 2, w // 2))
    scaled_latent = scaled_latent.astype(np.float32)
    expected = {
        **torch_outputs(theirs, image, latent),
        **flux2_pipeline_outputs(theirs, image, scaled_latent),
    }
    for name, value in _ours(ours, image, latent, scaled_latent).items():
        assert_close(value, expected[name], what=name)


@pytest.mark.torch
def test_diffusers_folders_both_ways(tmp_path):
    torch, diffusers = require_torch()
    theirs = diffusers_model(CASE.config, seed=11)
    theirs.save_pretrained(tmp_path / "src")
    ours = eqx_vae.load_diffusers(tmp_path / "src")
    assert ours.config.decoder_block_out_channels == (8, 16, 16)
    _assert_same_outputs(ours, theirs)
    assert ours.bn is not None
    np.testing.assert_array_equal(ours.bn.running_var, theirs.bn.running_var.numpy())
    assert int(ours.bn.num_batches_tracked) == int(theirs.bn.num_batches_tracked)

    eqx_vae.save_diffusers(tmp_path / "dst", ours)
    again, info = diffusers.AutoencoderKLFlux2.from_pretrained(
        tmp_path / "dst", torch_dtype=torch.float32, output_loading_info=True
    )
    assert info == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert eqx_vae.AutoencoderKLConfig.from_dict(dict(again.config)) == ours.config
    expected = eqx_vae.to_diffusers_state_dict(ours)
    state_dict = again.state_dict()
    assert set(state_dict) == set(expected)
    for name, value in state_dict.items():
        assert value.numpy().dtype == expected[name].dtype, name
        np.testing.assert_array_equal(value.numpy(), expected[name])
    _assert_same_outputs(ours, again.eval())
