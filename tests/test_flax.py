"""diffusers' `FlaxAutoencoderKL` parameters, both ways: against committed references
(no flax needed) and live (with flax and diffusers 0.39 installed)."""

import json
from collections.abc import Iterator, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax_cases import CASES, flatten, flax_model, flax_outputs, inputs, random_params, unflatten
from helpers import FIXTURES, assert_close, require_flax, small_config
from parity_cases import random_state_dict

import eqx_vae
from eqx_vae import CheckpointError


FIXTURE_PATHS = sorted(FIXTURES.glob("flax_*.npz"))


def load_flax_fixture(path) -> tuple[eqx_vae.AutoencoderKLConfig, dict, dict]:
    """A Flax fixture: the config, the parameters (nested, float32) and the rest."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    config = eqx_vae.AutoencoderKLConfig.from_dict(json.loads(str(arrays.pop("config"))))
    flat = {
        k.removeprefix("param/"): v.astype(np.float32)
        for k, v in arrays.items()
        if k.startswith("param/")
    }
    rest = {k: v for k, v in arrays.items() if not k.startswith("param/")}
    return config, unflatten(flat), rest


def _outputs(model: eqx_vae.AutoencoderKL, image, latent) -> dict[str, np.ndarray]:
    posterior = eqx.filter_jit(model.encode)(jnp.asarray(image))
    return {
        "mean": np.asarray(posterior.mean),
        "logvar": np.asarray(posterior.logvar),
        "decoded": np.asarray(eqx.filter_jit(model.decode)(jnp.asarray(latent))),
    }


def _assert_same_parameters(a: eqx_vae.AutoencoderKL, b: eqx_vae.AutoencoderKL) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _assert_same_tree(actual, expected) -> None:
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for x, y in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_fixtures_cover_every_case():
    assert {p.stem.removeprefix("flax_") for p in FIXTURE_PATHS} == {c.name for c in CASES}


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.stem)
def test_parity_with_flax_fixture(path):
    config, params, ref = load_flax_fixture(path)
    model = eqx_vae.from_flax_params(params, config)
    for name, value in _outputs(model, ref["image"], ref["latent"]).items():
        assert_close(value, ref[name], what=name)


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.stem)
def test_to_flax_params_round_trips_the_fixture_exactly(path):
    """The same paths, nesting, shapes, dtype and values as `init_weights` gave."""
    config, params, _ = load_flax_fixture(path)
    back = eqx_vae.to_flax_params(eqx_vae.from_flax_params(params, config))
    _assert_same_tree(back, params)
    assert all(type(node) is dict for node in _nodes(back))


def _nodes(tree: dict) -> Iterator[dict]:
    yield tree
    for value in tree.values():
        if isinstance(value, dict):
            yield from _nodes(value)


class _Frozen(Mapping):
    """An immutable mapping, as flax's `FrozenDict` is, without flax."""

    def __init__(self, items: dict):
        self._items = {k: _Frozen(v) if isinstance(v, dict) else v for k, v in items.items()}

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


@pytest.fixture(scope="module")
def one_level():
    config, params, _ = load_flax_fixture(FIXTURES / "flax_one_level_grey.npz")
    return config, params, eqx_vae.from_flax_params(params, config)


def test_accepts_every_form_of_the_tree(one_level):
    config, params, reference = one_level
    as_jax = jax.tree_util.tree_map(jnp.asarray, params)
    for tree in (
        {"params": params},
        as_jax,
        {"params": as_jax},
        _Frozen(params),
        _Frozen({"params": params}),
    ):
        _assert_same_parameters(eqx_vae.from_flax_params(tree, config.to_dict()), reference)


@pytest.mark.parametrize("stored", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_dtypes(one_level, stored):
    config, params, reference = one_level
    tree = jax.tree_util.tree_map(lambda a: a.astype(stored), params)
    loaded = eqx_vae.from_flax_params(tree, config)  # float32 unless told otherwise
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(loaded)} == {jnp.dtype(jnp.float32)}
    expected = jax.tree_util.tree_map(
        lambda a: a.astype(stored).astype(np.float32), eqx_vae.to_flax_params(reference)
    )
    _assert_same_tree(eqx_vae.to_flax_params(loaded), expected)
    half = eqx_vae.from_flax_params(tree, config, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    back = eqx_vae.to_flax_params(half)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(back)} == {
        np.dtype(ml_dtypes.bfloat16)
    }


@pytest.fixture(scope="module")
def model():
    """A small model with non-trivial GroupNorm parameters and biases everywhere."""
    config = small_config()
    skeleton = eqx_vae.to_diffusers_state_dict(
        eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    )
    weights = random_state_dict({k: v.shape for k, v in skeleton.items()}, seed=7)
    return eqx_vae.from_diffusers_state_dict(weights, config)


def test_the_flax_layout_of_every_kind_of_parameter(model):
    params = eqx_vae.to_flax_params(model)
    flat = flatten(params)
    enc, dec = model.encoder, model.decoder
    attention = enc.mid_block.attentions[0]
    assert attention is not None
    expected = {
        # Convolutions: HWIO kernels, (O,) biases.
        "encoder/conv_in/kernel": enc.conv_in.weight.transpose(2, 3, 1, 0),
        "encoder/conv_in/bias": enc.conv_in.bias.reshape(-1),
        "encoder/down_blocks_0/resnets_0/conv1/kernel": (
            enc.down_blocks[0].resnets[0].conv1.weight.transpose(2, 3, 1, 0)
        ),
        "encoder/down_blocks_0/downsamplers_0/conv/kernel": (
            enc.down_blocks[0].downsamplers[0].conv.weight.transpose(2, 3, 1, 0)
        ),
        "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel": (
            enc.down_blocks[1].resnets[0].conv_shortcut.weight.transpose(2, 3, 1, 0)
        ),
        "decoder/up_blocks_0/upsamplers_0/conv/bias": (
            dec.up_blocks[0].upsamplers[0].conv.bias.reshape(-1)
        ),
        "quant_conv/kernel": model.quant_conv.weight.transpose(2, 3, 1, 0),
        "post_quant_conv/bias": model.post_quant_conv.bias.reshape(-1),
        # GroupNorm: `scale` and `bias`.
        "encoder/down_blocks_1/resnets_0/norm2/scale": enc.down_blocks[1].resnets[0].norm2.weight,
        "encoder/conv_norm_out/scale": enc.conv_norm_out.weight,
        "decoder/conv_norm_out/bias": dec.conv_norm_out.bias,
        "encoder/mid_block/attentions_0/group_norm/scale": attention.group_norm.weight,
        # Attention: Dense layers with (in, out) kernels.
        "encoder/mid_block/attentions_0/query/kernel": attention.to_q.weight.T,
        "encoder/mid_block/attentions_0/key/bias": attention.to_k.bias,
        "encoder/mid_block/attentions_0/value/kernel": attention.to_v.weight.T,
        "encoder/mid_block/attentions_0/proj_attn/kernel": attention.to_out[0].weight.T,
        "decoder/mid_block/resnets_1/conv2/kernel": (
            dec.mid_block.resnets[1].conv2.weight.transpose(2, 3, 1, 0)
        ),
    }
    for path, value in expected.items():
        np.testing.assert_array_equal(flat[path], np.asarray(value), err_msg=path)
        assert flat[path].flags.c_contiguous, path
    assert len(flat) == len(eqx_vae.to_diffusers_state_dict(model))
    assert sorted(params) == ["decoder", "encoder", "post_quant_conv", "quant_conv"]


def test_models_without_quant_convs_or_mid_attention(getkey):
    for overrides in (
        dict(use_quant_conv=False, use_post_quant_conv=False),
        dict(use_quant_conv=False),
        dict(use_post_quant_conv=False, mid_block_add_attention=False),
    ):
        model = eqx_vae.AutoencoderKL(small_config(**overrides), key=getkey())
        params = eqx_vae.to_flax_params(model)
        assert ("quant_conv" in params) == model.config.use_quant_conv
        assert ("post_quant_conv" in params) == model.config.use_post_quant_conv
        has_attention = "attentions_0" in params["encoder"]["mid_block"]
        assert has_attention == model.config.mid_block_add_attention
        _assert_same_parameters(eqx_vae.from_flax_params(params, model.config), model)
    # diffusers' Flax parameters (with quant convs) against a config without them.
    model = eqx_vae.AutoencoderKL(small_config(), key=getkey())
    with pytest.raises(CheckpointError, match=r"(?s)use_quant_conv=False.*4 unexpected"):
        eqx_vae.from_flax_params(
            eqx_vae.to_flax_params(model),
            model.config.replace(use_quant_conv=False, use_post_quant_conv=False),
        )


def test_every_problem_reported_at_once(model):
    flat = flatten(eqx_vae.to_flax_params(model))
    del flat["decoder/conv_out/kernel"]
    del flat["quant_conv/bias"]
    flat["encoder/conv_in/kernel"] = np.zeros((5, 5, 3, 16), np.float32)
    flat["encoder/mid_block/attentions_0/query/kernel"] = np.zeros((32, 16), np.float32)
    flat["encoder/conv_in/weight"] = np.zeros((16, 3, 3, 3), np.float32)  # a PyTorch name
    flat["encoder/conv_out/bias"] = np.zeros((8,), np.int32)
    flat["decoder/conv_in/bias"] = "zeros"
    flat["decoder/conv_in/kernel"] = jax.ShapeDtypeStruct((3, 3, 4, 32), jnp.float32)
    with pytest.raises(CheckpointError) as info:
        eqx_vae.from_flax_params(unflatten(flat), model.config)
    message = str(info.value)
    assert message.startswith("Cannot load the Flax parameters into AutoencoderKL")
    assert "4 missing" in message
    assert "decoder/conv_out/kernel: expected shape (3, 3, 16, 3)" in message
    assert "quant_conv/bias: expected shape (8,)" in message
    assert "decoder/conv_in/bias: expected shape (32,)" in message
    assert "1 unexpected" in message and "encoder/conv_in/weight: shape (16, 3, 3, 3)" in message
    assert "2 mis-shaped" in message
    assert (
        "encoder/conv_in/kernel: params have shape (5, 5, 3, 16), model expects (3, 3, 3, 16)"
        in message
    )
    assert "query/kernel: params have shape (32, 16), model expects (32, 32)" in message
    assert "3 invalid" in message
    assert "encoder/conv_out/bias: dtype int32 is not floating point" in message
    assert "decoder/conv_in/bias: not an array but str" in message
    assert "decoder/conv_in/kernel: a jax.ShapeDtypeStruct, which holds no values" in message


def test_check_finite_both_ways(model):
    params = eqx_vae.to_flax_params(model)
    params["decoder"]["conv_out"]["kernel"][0, 0, 0, :2] = [np.nan, np.inf]
    loaded = eqx_vae.from_flax_params(params, model.config)  # not checked by default
    assert np.isnan(np.asarray(loaded.decoder.conv_out.weight)).any()
    with pytest.raises(
        CheckpointError, match=r"decoder/conv_out/kernel: 2 of 432 values are NaN or infinite"
    ):
        eqx_vae.from_flax_params(params, model.config, check_finite=True)


def test_wrong_arguments(model, without_typechecks):
    with pytest.raises(TypeError, match="nested mapping"):
        eqx_vae.from_flax_params([1, 2], model.config)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="must be an AutoencoderKL"):
        eqx_vae.to_flax_params(model.encoder)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="AutoencoderKLTemporalDecoder"):
        eqx_vae.from_flax_params(
            eqx_vae.to_flax_params(model),
            {**model.config.to_dict(), "_class_name": "AutoencoderKLTemporalDecoder"},
        )


def test_flax_config_json_is_accepted(model):
    config = {**model.config.to_dict(), "_class_name": "FlaxAutoencoderKL"}
    for key in ("shift_factor", "latents_mean", "latents_std", "force_upcast"):
        del config[key]  # fields FlaxAutoencoderKL does not have
    loaded = eqx_vae.from_flax_params(eqx_vae.to_flax_params(model), config)
    _assert_same_parameters(loaded, model)


# Live comparisons with diffusers' FlaxAutoencoderKL.


def _eqx_model(case, seed: int) -> eqx_vae.AutoencoderKL:
    config = eqx_vae.AutoencoderKLConfig.from_dict(case.config)
    shapes = eqx_vae.to_diffusers_state_dict(eqx_vae.AutoencoderKL(config, key=jax.random.key(0)))
    weights = random_state_dict({k: v.shape for k, v in shapes.items()}, seed)
    return eqx_vae.from_diffusers_state_dict(weights, config)


@pytest.mark.flax
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_to_flax_params_runs_in_flax_autoencoder_kl(case):
    require_flax()
    flax = pytest.importorskip("flax")

    model = _eqx_model(case, seed=11)
    flax_vae = flax_model(case.config)
    params = eqx_vae.to_flax_params(model)
    initial = flax.core.unfreeze(flax_vae.init_weights(jax.random.PRNGKey(0)))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(initial)
    for x, y in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(initial), strict=True
    ):
        assert x.shape == y.shape and x.dtype == y.dtype
    image, latent = inputs(case, 11)
    expected = flax_outputs(flax_vae, params, image, latent)
    for name, value in _outputs(model, image, latent).items():
        ratio = assert_close(value, expected[name], what=name)
        print(f"{case.name} {name}: max|diff| / max|ref| = {ratio:.2g}")


@pytest.mark.flax
@pytest.mark.parametrize("stored", [np.float32, ml_dtypes.bfloat16])
def test_loads_a_folder_flax_saved(tmp_path, stored):
    require_flax()
    flax = pytest.importorskip("flax")

    case = CASES[1]
    flax_vae = flax_model(case.config)
    params = jax.tree_util.tree_map(lambda a: a.astype(stored), random_params(flax_vae, 3))
    flax_vae.save_pretrained(tmp_path, params=flax.core.freeze(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_flax_model.msgpack",
    ]
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == (
        "FlaxAutoencoderKL"
    )
    loaded = eqx_vae.load_diffusers(tmp_path)
    _assert_same_parameters(loaded, eqx_vae.from_flax_params(params, case.config))
    _assert_same_parameters(
        eqx_vae.from_flax_params(flax.core.freeze({"params": params}), case.config), loaded
    )
    same_dtype = eqx_vae.load_diffusers(tmp_path, dtype=stored)
    _assert_same_tree(eqx_vae.to_flax_params(same_dtype), params)


@pytest.mark.flax
def test_save_diffusers_flax_format_loads_in_flax(tmp_path):
    FlaxAutoencoderKL = require_flax()
    flax = pytest.importorskip("flax")

    case = CASES[2]
    model = _eqx_model(case, seed=5)
    eqx_vae.save_diffusers(tmp_path, model, format="flax")
    flax_vae, params = FlaxAutoencoderKL.from_pretrained(tmp_path)
    loaded = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(params))
    _assert_same_tree(loaded, eqx_vae.to_flax_params(model))
    image, latent = inputs(case, 5)
    expected = flax_outputs(flax_vae, params, image, latent)
    for name, value in _outputs(model, image, latent).items():
        assert_close(value, expected[name], what=name)


@pytest.mark.flax
def test_chunked_arrays_agree_with_flax(tmp_path, monkeypatch):
    """Arrays over flax's chunk size are split the same way by both writers, and each
    reader reads the other's."""
    require_flax()
    serialization = pytest.importorskip("flax.serialization")

    from eqx_vae.interop import _flax_msgpack

    tree = {"a": {"b": np.arange(40, dtype=np.float32).reshape(5, 8)}, "c": np.ones(3)}
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)
    monkeypatch.setattr(_flax_msgpack, "_MAX_CHUNK_BYTES", 64)
    _flax_msgpack.write_flax_msgpack(tmp_path / "ours.msgpack", tree)
    theirs = serialization.msgpack_serialize(tree)
    assert (tmp_path / "ours.msgpack").read_bytes() == theirs
    _assert_same_tree(serialization.msgpack_restore(theirs), tree)
    (tmp_path / "theirs.msgpack").write_bytes(theirs)
    _assert_same_tree(_flax_msgpack.read_flax_msgpack(tmp_path / "theirs.msgpack"), tree)


def test_flux2_has_no_flax_layout():
    config = small_config(patch_size=(2, 2))
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"FLUX\.2's autoencoder has no Flax layout"):
        eqx_vae.to_flax_params(model)
    with pytest.raises(ValueError, match=r"FLUX\.2's autoencoder has no Flax layout"):
        eqx_vae.from_flax_params({}, config)
