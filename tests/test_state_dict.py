import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require_torch, small_config

import eqx_vae
from eqx_vae import CheckpointError


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))


def test_round_trip_is_identity(model):
    sd = eqx_vae.to_diffusers_state_dict(model)
    assert sd["encoder.conv_in.bias"].shape == (16,)  # PyTorch layout
    again = eqx_vae.from_diffusers_state_dict(sd, model.config)
    for a, b in zip(
        jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(again), strict=True
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert eqx.tree_equal(
        eqx.filter(model, eqx.is_array, inverse=True),
        eqx.filter(again, eqx.is_array, inverse=True),
    )


def test_accepts_config_dict_and_equinox_bias_shape(model):
    sd = {
        k: np.asarray(v).reshape(-1, 1, 1) if k.endswith("conv_in.bias") else v
        for k, v in eqx_vae.to_diffusers_state_dict(model).items()
    }
    again = eqx_vae.from_diffusers_state_dict(sd, model.config.to_dict())
    np.testing.assert_array_equal(again.encoder.conv_in.bias, model.encoder.conv_in.bias)


def test_old_attention_names(model):
    sd = eqx_vae.to_diffusers_state_dict(model)
    old = {}
    for k, v in sd.items():
        k = re.sub(r"attentions\.0\.to_q\.", "attentions.0.query.", k)
        k = re.sub(r"attentions\.0\.to_k\.", "attentions.0.key.", k)
        k = re.sub(r"attentions\.0\.to_v\.", "attentions.0.value.", k)
        k = re.sub(r"attentions\.0\.to_out\.0\.", "attentions.0.proj_attn.", k)
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    again = eqx_vae.from_diffusers_state_dict(old, model.config)
    np.testing.assert_array_equal(
        again.decoder.mid_block.attentions[0].to_out[0].weight,
        model.decoder.mid_block.attentions[0].to_out[0].weight,
    )
    both = dict(
        sd,
        **{
            "encoder.mid_block.attentions.0.query.weight": sd[
                "encoder.mid_block.attentions.0.to_q.weight"
            ]
        },
    )
    with pytest.raises(CheckpointError, match="given twice"):
        eqx_vae.from_diffusers_state_dict(both, model.config)


def test_every_problem_reported_at_once(model):
    sd = eqx_vae.to_diffusers_state_dict(model)
    del sd["decoder.conv_out.weight"]
    del sd["quant_conv.bias"]
    sd["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    sd["decoder.up_blocks.0.resnets.0.norm1.weight"] = np.zeros((31,), np.float32)
    sd["loss.logvar"] = np.zeros((), np.float32)
    sd["encoder.conv_out.bias"] = np.zeros((8,), np.int32)
    with pytest.raises(CheckpointError) as info:
        eqx_vae.from_diffusers_state_dict(sd, model.config)
    message = str(info.value)
    assert "2 missing" in message
    assert "decoder.conv_out.weight: expected shape (3, 16, 3, 3)" in message
    assert "quant_conv.bias: expected shape (8,)" in message
    assert "1 unexpected" in message and "loss.logvar" in message
    assert "2 mis-shaped" in message
    assert (
        "encoder.conv_in.weight: checkpoint has shape (16, 3, 5, 5), model expects (16, 3, 3, 3)"
        in message
    )
    norm = "decoder.up_blocks.0.resnets.0.norm1.weight"
    assert f"{norm}: checkpoint has shape (31,), model expects (32,)" in message
    assert "encoder.conv_out.bias: dtype int32 is not floating point" in message


def test_mismatched_config_reported(model):
    sd = eqx_vae.to_diffusers_state_dict(model)
    with pytest.raises(CheckpointError, match=r"post_quant_conv\.weight"):
        eqx_vae.from_diffusers_state_dict(sd, model.config.replace(use_post_quant_conv=False))


def test_dtype_argument(model):
    sd = eqx_vae.to_diffusers_state_dict(model)
    half = eqx_vae.from_diffusers_state_dict(sd, model.config, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    # Half-precision inputs become float32 parameters by default.
    sd16 = {k: v.astype(np.float16) for k, v in sd.items()}
    full = eqx_vae.from_diffusers_state_dict(sd16, model.config)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(full)} == {jnp.dtype(jnp.float32)}


def test_loading_builds_no_random_initialisation(model, monkeypatch):
    """The skeleton comes from `eqx.filter_eval_shape`: no parameter is drawn."""
    import eqx_vae._init

    concrete_draws = []
    original = eqx_vae._init._uniform_chunk

    def spy(*args):
        concrete_draws.append(args)
        return original(*args)

    monkeypatch.setattr(eqx_vae._init, "_uniform_chunk", spy)
    sd = eqx_vae.to_diffusers_state_dict(model)
    eqx_vae.from_diffusers_state_dict(sd, model.config)
    assert concrete_draws == []
    eqx_vae.AutoencoderKL(model.config, key=jax.random.key(0))
    assert len(concrete_draws) > 0  # the spy does see a real initialisation


@pytest.mark.torch
def test_accepts_torch_tensors(model):
    torch, _ = require_torch()
    sd = {
        k: torch.from_numpy(v.copy()).to(torch.bfloat16)
        for k, v in eqx_vae.to_diffusers_state_dict(model).items()
    }
    again = eqx_vae.from_diffusers_state_dict(sd, model.config)
    np.testing.assert_allclose(
        again.encoder.conv_in.weight, model.encoder.conv_in.weight, rtol=1e-2
    )
