"""Original single-file checkpoints: LDM names, prefixes, architecture inference and the
latent-scaling presets."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, require_torch, small_config

import eqx_vae
from eqx_vae import AutoencoderKLConfig, CheckpointError
from eqx_vae.interop import SafetensorsFile, write_safetensors


def _tiny(**overrides) -> eqx_vae.AutoencoderKL:
    config = small_config(block_out_channels=(32, 32), norm_num_groups=32, **overrides)
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def _ldm_tensors(model, tmp_path) -> dict[str, np.ndarray]:
    path = tmp_path / "plain.safetensors"
    eqx_vae.save_single_file(path, model)
    with SafetensorsFile(path) as f:
        return {name: ref.read() for name, ref in f.items()}


def _same_model(a, b):
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8), minval=-1, maxval=1)
    assert_close(b(x), a(x), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.torch
def test_written_file_loads_in_diffusers(tmp_path):
    torch, diffusers = require_torch()
    model = _tiny()
    eqx_vae.save_single_file(tmp_path / "vae.safetensors", model)
    eqx_vae.save_diffusers(tmp_path / "config", model)  # from_single_file reads config.json here
    theirs = diffusers.AutoencoderKL.from_single_file(
        tmp_path / "vae.safetensors", config=str(tmp_path / "config")
    )
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 8)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)[None]).sample[0].numpy()
    assert_close(model(jnp.asarray(x)), expected)


def test_ldm_names_and_attention_convs(tmp_path):
    tensors = _ldm_tensors(_tiny(), tmp_path)
    assert tensors["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert "encoder.down.0.downsample.conv.weight" in tensors
    assert "decoder.up.1.block.1.conv2.weight" in tensors  # decoder index reversed
    assert "decoder.up.1.block.2.conv2.weight" not in tensors  # layers_per_block + 1 blocks
    assert "decoder.up.1.upsample.conv.weight" in tensors
    assert "decoder.up.0.upsample.conv.weight" not in tensors
    assert "encoder.norm_out.weight" in tensors and "decoder.mid.block_2.norm1.bias" in tensors


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_prefixes_and_ignored_training_keys(tmp_path, prefix):
    model = _tiny()
    tensors = {prefix + k: v for k, v in _ldm_tensors(model, tmp_path).items()}
    tensors[prefix + "loss.logvar"] = np.zeros((), np.float32)
    tensors[prefix + "loss.discriminator.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
    tensors[prefix + "model_ema.decay"] = np.zeros((), np.float32)
    if prefix:
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4), np.float32)
    write_safetensors(tmp_path / "ckpt.safetensors", tensors)
    loaded = eqx_vae.load_single_file(tmp_path / "ckpt.safetensors", config=model.config)
    _same_model(model, loaded)


def test_save_single_file_takes_the_path_first(tmp_path):
    model = _tiny()
    eqx_vae.save_single_file(tmp_path / "new.safetensors", model, dtype=jnp.float16)
    expected = (tmp_path / "new.safetensors").read_bytes()
    eqx_vae.save_single_file(path=tmp_path / "kw.safetensors", model=model, dtype=jnp.float16)
    assert (tmp_path / "kw.safetensors").read_bytes() == expected
    message = r"`eqx_vae\.save_single_file\(model, path, \.\.\.\)` is deprecated.*\(path, model"
    # The old order, model first, for one release.
    with pytest.warns(DeprecationWarning, match=message) as warned:
        eqx_vae.save_single_file(model, tmp_path / "old.safetensors", dtype=jnp.float16)  # pyright: ignore[reportArgumentType, reportCallIssue]
    assert warned[0].filename == __file__  # points at the caller
    with pytest.warns(DeprecationWarning, match=message):
        eqx_vae.save_single_file(model, path=tmp_path / "old-kw.safetensors", dtype=jnp.float16)  # pyright: ignore[reportArgumentType, reportCallIssue]
    for name in ("old.safetensors", "old-kw.safetensors"):
        assert (tmp_path / name).read_bytes() == expected


def test_architecture_is_inferred(tmp_path):
    model = eqx_vae.AutoencoderKL(
        AutoencoderKLConfig(
            in_channels=4,
            out_channels=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=3,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=True,
            mid_block_add_attention=False,
        ),
        key=jax.random.key(0),
    )
    eqx_vae.save_single_file(tmp_path / "vae.safetensors", model)
    # The architecture is read off the shapes, but the scaling needs a preset or config:
    with pytest.raises(CheckpointError, match=r"16 latent channels.*preset=.*\['sd3', 'flux1'\]"):
        eqx_vae.load_single_file(tmp_path / "vae.safetensors")
    from eqx_vae.interop._single_file import infer_config

    with SafetensorsFile(tmp_path / "vae.safetensors") as f:
        inferred = infer_config(f)
    assert inferred.replace(scaling_factor=model.config.scaling_factor) == model.config


def test_whole_model_checkpoint_names_its_family(tmp_path):
    model = _tiny()
    tensors = {"first_stage_model." + k: v for k, v in _ldm_tensors(model, tmp_path).items()}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.zeros(
        (1, 77), np.int64
    )
    write_safetensors(tmp_path / "sd15.safetensors", tensors)
    # The family is known (SD 1.x), but this tiny file does not have its architecture.
    with pytest.raises(
        CheckpointError, match=r"does not have the 'sd15' architecture.*block_out_channels"
    ):
        eqx_vae.load_single_file(tmp_path / "sd15.safetensors")


def _full_size_file(tmp_path, preset: str, prefix: str = "", extra=()) -> str:
    """A zero-filled float16 file with the published architecture of `preset`."""
    from eqx_vae._state_dict import abstract_model, named_parameters
    from eqx_vae.interop._single_file import to_ldm_name

    config = getattr(AutoencoderKLConfig, preset)()
    tensors = {}
    for name, leaf in named_parameters(abstract_model(config)):
        ldm = to_ldm_name(name, 4)
        shape = leaf.shape[:1] if len(leaf.shape) == 3 else leaf.shape
        if ".attn_1." in ldm and ldm.endswith("weight") and ".norm." not in ldm:
            shape = (*shape, 1, 1)
        tensors[prefix + ldm] = np.zeros(shape, np.float16)
    tensors.update({k: np.zeros((1,), np.float16) for k in extra})
    path = tmp_path / f"{preset}.safetensors"
    write_safetensors(path, tensors)
    return str(path)


@pytest.mark.slow
def test_flux_and_sd3_files_need_a_preset(tmp_path):
    flux = _full_size_file(tmp_path, "flux1")
    with pytest.raises(CheckpointError, match=r"16 latent channels.*\['sd3', 'flux1'\]"):
        eqx_vae.load_single_file(flux, dtype=jnp.float16)
    model = eqx_vae.load_single_file(flux, preset="flux1", dtype=jnp.float16)
    assert (model.config.scaling_factor, model.config.shift_factor) == (0.3611, 0.1159)
    assert model.quant_conv is None and model.post_quant_conv is None
    sd3 = eqx_vae.load_single_file(flux, preset="sd3", dtype=jnp.float16)
    assert (sd3.config.scaling_factor, sd3.config.shift_factor) == (1.5305, 0.0609)
    with pytest.raises(
        CheckpointError, match=r"does not have the 'sdxl' architecture.*latent_channels: file 16"
    ):
        eqx_vae.load_single_file(flux, preset="sdxl", dtype=jnp.float16)


def test_sd3_whole_checkpoint_is_recognised(tmp_path):
    path = _full_size_file(
        tmp_path,
        "sd3",
        prefix="first_stage_model.",
        extra=["model.diffusion_model.joint_blocks.0.x"],
    )
    model = eqx_vae.load_single_file(path, dtype=jnp.float16)
    assert model.config == AutoencoderKLConfig.sd3()


def test_sd15_vae_file_needs_a_preset(tmp_path):
    path = _full_size_file(tmp_path, "sd15")
    with pytest.raises(
        CheckpointError, match=r"4 latent channels.*\['sd15', 'sd2', 'sdxl', 'playground25'\]"
    ):
        eqx_vae.load_single_file(path, dtype=jnp.float16)
    assert (
        eqx_vae.load_single_file(path, preset="sdxl", dtype=jnp.float16).config.scaling_factor
        == 0.13025
    )


def test_diffusers_named_single_file(tmp_path):
    model = _tiny()
    write_safetensors(tmp_path / "d.safetensors", eqx_vae.to_diffusers_state_dict(model))
    _same_model(model, eqx_vae.load_single_file(tmp_path / "d.safetensors", config=model.config))


def test_linear_attention_weights_accepted(tmp_path):
    model = _tiny()
    tensors = _ldm_tensors(model, tmp_path)
    tensors = {
        k: (v[:, :, 0, 0] if v.ndim == 4 and ".attn_1." in k else v) for k, v in tensors.items()
    }
    write_safetensors(tmp_path / "linear.safetensors", tensors)
    _same_model(
        model, eqx_vae.load_single_file(tmp_path / "linear.safetensors", config=model.config)
    )


def test_problems_named_in_ldm_file(tmp_path):
    model = _tiny()
    tensors = _ldm_tensors(model, tmp_path)
    del tensors["decoder.up.1.block.0.conv1.weight"]
    tensors["encoder.mid.attn_1.q.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    write_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as info:
        eqx_vae.load_single_file(tmp_path / "bad.safetensors", config=model.config)
    message = str(info.value)
    assert "decoder.up_blocks.0.resnets.0.conv1.weight: expected shape (32, 32, 3, 3)" in message
    assert "encoder.mid_block.attentions.0.to_q.weight: checkpoint has shape (32, 16)" in message


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        eqx_vae.load_single_file(
            tmp_path / "x.safetensors", config=AutoencoderKLConfig(), preset="sd15"
        )
    with pytest.raises(ValueError, match="Unknown `preset='sd4'`"):
        eqx_vae.load_single_file(tmp_path / "x.safetensors", preset="sd4")
    with pytest.raises(CheckpointError, match="does not exist"):
        eqx_vae.load_single_file(tmp_path / "x.safetensors", preset="sd15")
    write_safetensors(
        tmp_path / "unet.safetensors", {"model.diffusion_model.x": np.zeros(2, np.float32)}
    )
    with pytest.raises(CheckpointError, match="holds no autoencoder weights"):
        eqx_vae.load_single_file(tmp_path / "unet.safetensors", preset="sd15")


@pytest.mark.torch
def test_pickled_checkpoint_through_torch(tmp_path):
    torch, _ = require_torch()
    model = _tiny()
    tensors = {
        "first_stage_model." + k: torch.from_numpy(v)
        for k, v in _ldm_tensors(model, tmp_path).items()
    }
    torch.save({"state_dict": tensors, "global_step": 10}, tmp_path / "model.ckpt")
    _same_model(model, eqx_vae.load_single_file(tmp_path / "model.ckpt", config=model.config))


def test_pickled_checkpoint_without_torch(tmp_path, monkeypatch):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(
        CheckpointError, match=r"(?s)PyTorch pickle.*weights_only=True.*safetensors"
    ):
        eqx_vae.load_single_file(tmp_path / "model.ckpt", preset="sd15")


@pytest.mark.torch
def test_unsafe_pickle_is_refused(tmp_path):
    torch, _ = require_torch()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        eqx_vae.load_single_file(tmp_path / "evil.ckpt", preset="sd15")
