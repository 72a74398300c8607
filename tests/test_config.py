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


def _signature_defaults(cls) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {
        k: tuple(p.default) if isinstance(p.default, list) else p.default
        for k, p in params.items()
        if k != "self"
    }


@pytest.mark.torch
def test_fields_and_defaults_match_diffusers_signature():
    _, diffusers = require_torch()
    theirs = _signature_defaults(diffusers.AutoencoderKL)
    flux2 = _signature_defaults(diffusers.AutoencoderKLFlux2)
    ours = {f.name: f.default for f in dataclasses.fields(AutoencoderKLConfig)}
    # Every field is one of the two classes'; AutoencoderKL's have its defaults.
    assert set(ours) == set(theirs) | set(flux2)
    for name, expected in theirs.items():
        assert ours[name] == expected, name
    # An AutoencoderKLFlux2 config.json that leaves keys out gets that class's defaults.
    config = AutoencoderKLConfig.from_dict({"_class_name": "AutoencoderKLFlux2"})
    for name, expected in flux2.items():
        assert getattr(config, name) == expected, name
    assert config == AutoencoderKLConfig.flux2()


@pytest.mark.torch
@pytest.mark.parametrize("preset", eqx_vae.PRESETS)
def test_presets_are_accepted_by_diffusers(preset):
    _, diffusers = require_torch()
    config = getattr(AutoencoderKLConfig, preset)()
    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    theirs = getattr(diffusers, config.class_name).from_config(kwargs).config
    # diffusers adds the class name when it writes `config.json`.
    assert AutoencoderKLConfig.from_dict({"_class_name": config.class_name, **theirs}) == config


@pytest.mark.parametrize("preset", eqx_vae.PRESETS)
def test_dict_round_trip(preset):
    config = getattr(AutoencoderKLConfig, preset)()
    as_json = json.loads(json.dumps(config.to_dict()))
    family = "AutoencoderKLFlux2" if preset == "flux2" else "AutoencoderKL"
    assert as_json["_class_name"] == family
    assert AutoencoderKLConfig.from_dict(as_json) == config
    assert hash(AutoencoderKLConfig.from_dict(as_json)) == hash(config)


def test_earlier_families_write_the_same_config_json():
    """The new fields stay out of the other families' `config.json` (and eqx_vae
    checkpoint headers), which are what they were."""
    keys = [
        "_class_name",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "scaling_factor",
        "shift_factor",
        "latents_mean",
        "latents_std",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ]
    for preset in eqx_vae.PRESETS:
        if preset != "flux2":
            assert list(getattr(AutoencoderKLConfig, preset)().to_dict()) == keys


def test_flux2_config_dict():
    config = AutoencoderKLConfig.flux2()
    assert config.class_name == "AutoencoderKLFlux2"
    assert (config.latent_channels, config.patch_size, config.batch_norm_eps) == (32, (2, 2), 1e-4)
    assert config.use_quant_conv and config.use_post_quant_conv and config.force_upcast
    assert (config.spatial_factor, config.latent_patch, config.scaled_latent_channels) == (
        8,
        (2, 2),
        128,
    )
    assert config.decoder_channels == config.block_out_channels
    as_dict = config.to_dict()
    assert list(as_dict) == [
        "_class_name",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "decoder_block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
        "batch_norm_eps",
        "batch_norm_momentum",
        "patch_size",
    ]
    assert as_dict["patch_size"] == [2, 2] and as_dict["decoder_block_out_channels"] is None
    # `force_upcast` is written only when it is not the published value.
    no_upcast = config.replace(force_upcast=False)
    assert no_upcast.to_dict()["force_upcast"] is False
    assert AutoencoderKLConfig.from_dict(no_upcast.to_dict()) == no_upcast
    narrow = config.replace(decoder_block_out_channels=(64, 128, 256, 256))
    assert narrow.decoder_channels == (64, 128, 256, 256)
    assert AutoencoderKLConfig.from_dict(narrow.to_dict()) == narrow
    other = AutoencoderKLConfig.sd15()
    assert (other.class_name, other.latent_patch, other.scaled_latent_channels) == (
        "AutoencoderKL",
        (1, 1),
        4,
    )


def test_published_flux2_config_json():
    """FLUX.2-dev's `vae/config.json` as published (with the legacy `force_upcast`,
    which diffusers' AutoencoderKLFlux2 no longer declares)."""
    published = {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": "0.36.0.dev0",
        "act_fn": "silu",
        "batch_norm_eps": 0.0001,
        "batch_norm_momentum": 0.1,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 32,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "patch_size": [2, 2],
        "sample_size": 1024,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }
    assert AutoencoderKLConfig.from_dict(published) == AutoencoderKLConfig.flux2()


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
    flux2 = AutoencoderKLConfig.flux2()
    assert flux2.block_out_channels == (128, 256, 512, 512) and flux2.layers_per_block == 2
    assert (flux2.latent_channels, flux2.sample_size, flux2.norm_num_groups) == (32, 1024, 32)
    assert flux2.batch_norm_momentum == 0.1 and flux2.mid_block_add_attention


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
        ({"patch_size": [2, 2]}, r"AutoencoderKL configs have no \['patch_size'\].*Flux2"),
        ({"batch_norm_eps": 1e-5}, "batch_norm_eps"),
        ({"decoder_block_out_channels": [64, 64]}, r"has 2 levels but .* has 1"),
        ({"decoder_block_out_channels": [48]}, r"norm_num_groups=32.*48.*decoder_block_out"),
        ({"decoder_block_out_channels": [0]}, "decoder_block_out_channels"),
        ({"_class_name": "AutoencoderKLFlux2", "scaling_factor": 0.3611}, "BatchNorm statistics"),
        ({"_class_name": "AutoencoderKLFlux2", "shift_factor": 0.1}, r"no \['shift_factor'\]"),
        ({"_class_name": "AutoencoderKLFlux2", "patch_size": None}, "got None"),
        ({"_class_name": "AutoencoderKLFlux2", "patch_size": [2, 2, 2]}, "patch_size"),
        ({"_class_name": "AutoencoderKLFlux2", "batch_norm_eps": 0}, "batch_norm_eps"),
        ({"_class_name": "AutoencoderKLFlux2", "batch_norm_momentum": 2}, r"\[0, 1\]"),
        ({"_class_name": "AutoencoderKLFlux2", "unknown": 1}, r"Unknown AutoencoderKLFlux2.*"),
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
    # Each family's latent convention only: no BatchNorm without a patch size, no scaling
    # with one.
    with pytest.raises(ValueError, match=r"`batch_norm_momentum=0.2` belongs to FLUX.2"):
        config.replace(batch_norm_momentum=0.2)
    flux2 = AutoencoderKLConfig.flux2()
    with pytest.raises(ValueError, match=r"`latents_mean=.*does not apply to the FLUX.2 family"):
        flux2.replace(latents_mean=(0.0,) * 32, latents_std=(1.0,) * 32)
    assert flux2.replace(patch_size=None).class_name == "AutoencoderKL"
