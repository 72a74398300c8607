import dataclasses
import inspect
import json

import pytest
from helpers import require_torch

import eqx_vae
from eqx_vae import AutoencoderKLConfig


def test_defaults_are_diffusers_defaults():
    c = AutoencoderKLConfig()
    assert c.block_out_channels == (64,)
    assert c.layers_per_block == 1
    assert c.latent_channels == 4
    assert c.norm_num_groups == 32
    assert c.scaling_factor == 0.18215
    assert c.shift_factor is None
    assert c.force_upcast is True
    assert c.use_quant_conv and c.use_post_quant_conv and c.mid_block_add_attention


@pytest.mark.torch
def test_fields_and_defaults_match_diffusers_signature():
    _, diffusers = require_torch()
    params = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    ours = {f.name: f.default for f in dataclasses.fields(AutoencoderKLConfig)}
    assert set(ours) == set(theirs)
    for name, default in ours.items():
        expected = theirs[name]
        if isinstance(expected, list):
            expected = tuple(expected)
        assert default == expected, name


@pytest.mark.torch
@pytest.mark.parametrize("preset", eqx_vae.PRESETS)
def test_presets_are_accepted_by_diffusers(preset):
    _, diffusers = require_torch()
    config = getattr(AutoencoderKLConfig, preset)()
    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    theirs = diffusers.AutoencoderKL.from_config(kwargs).config
    assert AutoencoderKLConfig.from_dict(dict(theirs)) == config


@pytest.mark.parametrize("preset", eqx_vae.PRESETS)
def test_dict_round_trip(preset):
    config = getattr(AutoencoderKLConfig, preset)()
    as_json = json.loads(json.dumps(config.to_dict()))
    assert as_json["_class_name"] == "AutoencoderKL"
    assert AutoencoderKLConfig.from_dict(as_json) == config
    assert hash(AutoencoderKLConfig.from_dict(as_json)) == hash(config)


def test_preset_values():
    sd15, sdxl, sd3, flux, pg = (
        AutoencoderKLConfig.sd15(),
        AutoencoderKLConfig.sdxl(),
        AutoencoderKLConfig.sd3(),
        AutoencoderKLConfig.flux1(),
        AutoencoderKLConfig.playground25(),
    )
    for c in (sd15, sdxl, sd3, flux, pg):
        assert c.block_out_channels == (128, 256, 512, 512)
        assert c.layers_per_block == 2
        assert c.norm_num_groups == 32
        assert c.spatial_factor == 8
    assert (sd15.latent_channels, sd15.scaling_factor, sd15.shift_factor) == (4, 0.18215, None)
    assert AutoencoderKLConfig.sd2().sample_size == 768
    assert (sdxl.scaling_factor, sdxl.sample_size) == (0.13025, 1024)
    assert (sd3.latent_channels, sd3.scaling_factor, sd3.shift_factor) == (16, 1.5305, 0.0609)
    assert not sd3.use_quant_conv and not sd3.use_post_quant_conv
    assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor) == (16, 0.3611, 0.1159)
    assert not flux.use_quant_conv and not flux.use_post_quant_conv
    assert pg.scaling_factor == 0.5
    assert pg.latents_mean == (-1.6574, 1.886, -1.383, 2.5155)
    assert pg.latents_std == (8.4927, 5.9022, 6.5498, 5.2299)


def test_bookkeeping_keys_accepted():
    config = AutoencoderKLConfig.from_dict(
        {
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.30.0",
            "_name_or_path": "some/where",
            "sample_size": [512, 768],
        }
    )
    assert config.sample_size == (512, 768)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"blocks_out_channels": [64]}, "blocks_out_channels"),
        ({"_class_name": "AutoencoderKLTemporalDecoder"}, "AutoencoderKLTemporalDecoder"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
        ({"up_block_types": ["AttnUpDecoderBlock2D"]}, "AttnUpDecoderBlock2D"),
        ({"act_fn": "gelu"}, "gelu"),
        ({"block_out_channels": [64, 128]}, r"pass `down_block_types"),
        ({"norm_num_groups": 24}, r"norm_num_groups=24.*64"),
        ({"latents_mean": [0.0] * 4}, "latents_std"),
        ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "3 entries"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, "one of"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"scaling_factor": float("nan")}, "scaling_factor"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"layers_per_block": 1.5}, "layers_per_block"),
        ({"use_quant_conv": "yes"}, "use_quant_conv"),
        ({"sample_size": [1, 2, 3]}, "sample_size"),
        ({"block_out_channels": []}, "at least one level"),
    ],
)
def test_invalid_configs_raise_naming_the_value(config, match, without_typechecks):
    with pytest.raises(ValueError, match=match):
        AutoencoderKLConfig.from_dict(config)


def test_from_dict_rejects_non_mappings(without_typechecks):
    with pytest.raises(ValueError, match="mapping"):
        AutoencoderKLConfig.from_dict([("latent_channels", 4)])  # pyright: ignore[reportArgumentType]


def test_replace_validates():
    config = AutoencoderKLConfig.sd15()
    assert config.replace(latent_channels=16).latent_channels == 16
    with pytest.raises(ValueError, match="norm_num_groups"):
        config.replace(norm_num_groups=48)
