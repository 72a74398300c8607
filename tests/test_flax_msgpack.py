"""diffusers' Flax weight files (`diffusion_flax_model.msgpack`), read and written
without flax: a file flax wrote, round trips, and a clear error for every kind of
damaged file."""

import contextlib
import json
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax_cases import flatten, unflatten
from helpers import FIXTURES, small_config
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_vae
from eqx_vae import CheckpointError
from eqx_vae.cli import main
from eqx_vae.interop._flax_msgpack import (
    FLAX_WEIGHTS_NAME,
    read_flax_msgpack,
    write_flax_msgpack,
)


msgpack = pytest.importorskip("msgpack")


def _pack(tree) -> bytes:
    """flax.serialization's layout, written independently of eqx_vae's writer: arrays
    become extension 1, anything else msgpack packs itself (`ExtType`s included)."""

    def encode(value):
        record = (list(value.shape), value.dtype.name, value.tobytes())
        return msgpack.ExtType(1, msgpack.packb(record, use_bin_type=True))

    return msgpack.packb(tree, default=encode, use_bin_type=True)


def _record(shape, dtype: str, data):
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, data), use_bin_type=True))


def _assert_same_parameters(a, b) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_reads_the_folder_flax_wrote():
    """`FlaxAutoencoderKL.save_pretrained` wrote it (`make_flax_fixtures.py`), with the
    float16 parameters of `flax_one_level_grey.npz`."""
    folder = FIXTURES / "flax_msgpack"
    with np.load(FIXTURES / "flax_one_level_grey.npz") as data:
        config = json.loads(str(data["config"]))
        flat = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    tree = read_flax_msgpack(folder / FLAX_WEIGHTS_NAME)
    assert flatten(tree).keys() == flat.keys()
    for path, value in flatten(tree).items():
        assert value.dtype == np.float16 and value.shape == flat[path].shape, path
        np.testing.assert_array_equal(value, flat[path])
    expected = eqx_vae.from_flax_params(unflatten(flat), config)
    _assert_same_parameters(eqx_vae.load_diffusers(folder), expected)
    half = eqx_vae.load_diffusers(folder, dtype=jnp.float16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.float16)}
    _assert_same_parameters(
        half, eqx_vae.from_flax_params(unflatten(flat), config, dtype="float16")
    )


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(
        small_config(block_out_channels=(8,), norm_num_groups=4), key=jax.random.key(0)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_writer_and_reader_round_trip(tmp_path, model, dtype):
    tree = jax.tree_util.tree_map(lambda a: a.astype(dtype), eqx_vae.to_flax_params(model))
    tree["extra"] = {"counts": np.arange(5, dtype=np.int64), "flag": np.array(True)}
    write_flax_msgpack(tmp_path / "w.msgpack", tree)
    # The same bytes as flax.serialization writes (an independent packer of its layout).
    assert (tmp_path / "w.msgpack").read_bytes() == _pack(tree)
    back = read_flax_msgpack(tmp_path / "w.msgpack")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_big_endian_arrays_are_written_little_endian(tmp_path):
    value = np.arange(6, dtype=">f4").reshape(2, 3)
    write_flax_msgpack(tmp_path / "w.msgpack", {"a": value})
    back = read_flax_msgpack(tmp_path / "w.msgpack")["a"]
    assert back.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back, value)
    with pytest.raises(ValueError, match="dtype <U1"):
        write_flax_msgpack(tmp_path / "s.msgpack", {"a": np.array(["x"])})


def test_chunked_arrays(tmp_path, monkeypatch):
    from eqx_vae.interop import _flax_msgpack

    monkeypatch.setattr(_flax_msgpack, "_MAX_CHUNK_BYTES", 40)
    tree = {"a": {"b": np.arange(36, dtype=np.float32).reshape(3, 4, 3)}, "c": np.ones(5)}
    write_flax_msgpack(tmp_path / "w.msgpack", tree)
    raw = msgpack.unpackb((tmp_path / "w.msgpack").read_bytes())
    assert raw["a"]["b"]["__msgpack_chunked_array__"] is True
    assert len(raw["a"]["b"]["chunks"]) == 4  # 10 + 10 + 10 + 6 values
    assert raw["a"]["b"]["shape"] == {"0": 3, "1": 4, "2": 3}
    back = read_flax_msgpack(tmp_path / "w.msgpack")
    np.testing.assert_array_equal(back["a"]["b"], tree["a"]["b"])
    np.testing.assert_array_equal(back["c"], tree["c"])


def test_other_values_in_the_tree(tmp_path):
    scalar = msgpack.ExtType(3, msgpack.packb(((), "float32", b"\0\0\x80?"), use_bin_type=True))
    tree = {
        "scalar": scalar,
        "complex": msgpack.ExtType(2, msgpack.packb((1.0, -2.0))),
        "unknown": msgpack.ExtType(9, b"xyz"),
        "number": 3,
        "text": "x",
        "list": [1, 2],
        "empty": {},
    }
    (tmp_path / "t.msgpack").write_bytes(_pack(tree))
    back = read_flax_msgpack(tmp_path / "t.msgpack")
    assert back["scalar"] == 1.0 and back["scalar"].shape == () and back["scalar"].dtype == "f4"
    assert not isinstance(back["scalar"], np.ndarray)  # a NumPy scalar
    assert back["complex"] == complex(1.0, -2.0)
    assert back["unknown"].reason == "a msgpack extension of unknown type 9"
    assert back["number"] == 3 and back["text"] == "x" and back["list"] == [1, 2]


def test_save_diffusers_flax_format(tmp_path, model):
    eqx_vae.save_diffusers(tmp_path / "f", model, format="flax")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["config.json", FLAX_WEIGHTS_NAME]
    _assert_same_parameters(eqx_vae.load_diffusers(tmp_path / "f"), model)
    eqx_vae.save_diffusers(tmp_path / "h", model, format="flax", dtype=jnp.bfloat16)
    stored = read_flax_msgpack(tmp_path / "h" / FLAX_WEIGHTS_NAME)
    assert {a.dtype for a in jax.tree_util.tree_leaves(stored)} == {np.dtype(ml_dtypes.bfloat16)}
    half = eqx_vae.load_diffusers(tmp_path / "h", dtype=jnp.bfloat16)
    _assert_same_parameters(half, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), model))
    with pytest.raises(ValueError, match="Flax weights have no variants"):
        eqx_vae.save_diffusers(tmp_path / "v", model, format="flax", variant="fp16")


def test_save_diffusers_refuses_other_formats(tmp_path, model, without_typechecks):
    with pytest.raises(ValueError, match="`format` must be"):
        eqx_vae.save_diffusers(tmp_path, model, format="onnx")  # pyright: ignore[reportArgumentType]


def test_pytorch_weights_come_first(tmp_path, model, getkey):
    other = eqx_vae.AutoencoderKL(model.config, key=getkey())
    eqx_vae.save_diffusers(tmp_path, model)
    eqx_vae.save_diffusers(tmp_path, other, format="flax")
    _assert_same_parameters(eqx_vae.load_diffusers(tmp_path), model)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    _assert_same_parameters(eqx_vae.load_diffusers(tmp_path), other)
    with pytest.raises(
        CheckpointError,
        match=r"variant='fp16'.*present: \['diffusion_flax_model\.msgpack'\]",
    ):
        eqx_vae.load_diffusers(tmp_path, variant="fp16")


def test_pipeline_folder_and_convert_command(tmp_path, model):
    eqx_vae.save_diffusers(tmp_path / "pipeline" / "vae", model, format="flax")
    _assert_same_parameters(eqx_vae.from_pretrained(tmp_path / "pipeline"), model)
    assert main(["convert", str(tmp_path / "pipeline" / "vae"), str(tmp_path / "m.eqx")]) == 0
    _assert_same_parameters(eqx_vae.load(tmp_path / "m.eqx"), model)


def test_non_finite_weights_named_by_flax_path(tmp_path, model):
    params = eqx_vae.to_flax_params(model)
    params["encoder"]["mid_block"]["attentions_0"]["value"]["kernel"][1, 2] = np.nan
    write_flax_msgpack(tmp_path / FLAX_WEIGHTS_NAME, params)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    eqx_vae.load_diffusers(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"encoder/mid_block/attentions_0/value/kernel: 1 of 64 values are NaN",
    ):
        eqx_vae.load_diffusers(tmp_path, check_finite=True)


def test_msgpack_is_needed_and_named(tmp_path, model, monkeypatch):
    eqx_vae.save_diffusers(tmp_path, model, format="flax")
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(CheckpointError, match=r"needs the msgpack package.*eqx_vae\[flax\]"):
        eqx_vae.load_diffusers(tmp_path)
    with pytest.raises(CheckpointError, match=r"eqx_vae\[flax\]"):
        eqx_vae.save_diffusers(tmp_path / "again", model, format="flax")


@pytest.fixture(scope="module")
def flax_folder(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("flax")
    eqx_vae.save_diffusers(folder, model, format="flax")
    return folder, (folder / FLAX_WEIGHTS_NAME).read_bytes()


@contextlib.contextmanager
def _written(folder, data: bytes):
    target = folder / FLAX_WEIGHTS_NAME
    original = target.read_bytes()
    target.write_bytes(data)
    try:
        yield
    finally:
        target.write_bytes(original)


def _message(folder, data: bytes) -> str:
    with _written(folder, data), pytest.raises(CheckpointError) as info:
        eqx_vae.load_diffusers(folder)
    return str(info.value)


def test_damaged_files(flax_folder):
    folder, original = flax_folder
    path = str(folder / FLAX_WEIGHTS_NAME)
    assert "is empty" in _message(folder, b"")
    assert f"{path} is truncated, damaged or not a Flax msgpack file" in _message(
        folder, original[:-3]
    )
    assert "ExtraData" in _message(folder, original + b"\x01")
    assert "does not hold a map of parameters but a list" in _message(folder, _pack([1, 2]))
    assert "not a Flax msgpack file" in _message(folder, b"\xc1")  # a reserved byte


def test_damaged_arrays_reported_with_their_paths(flax_folder, model):
    folder, _ = flax_folder
    flat = flatten(eqx_vae.to_flax_params(model))
    flat["encoder/conv_in/bias"] = _record([8], "float32", b"\0" * 31)
    flat["encoder/conv_in/kernel"] = _record([3, 3, 3, 8], "float128", b"")
    flat["encoder/conv_out/bias"] = _record([-1], "float32", b"")
    flat["encoder/conv_out/kernel"] = msgpack.ExtType(1, msgpack.packb([[1], "float32"]))
    flat["decoder/conv_in/bias"] = msgpack.ExtType(1, b"\xc1")
    flat["decoder/conv_in/kernel"] = _record([8], "float32", 5)
    flat["decoder/conv_out/bias"] = {
        "__msgpack_chunked_array__": True,
        "shape": {"0": 3},
        "chunks": {"0": np.zeros(2, np.float32)},
    }
    flat["quant_conv/bias"] = msgpack.ExtType(2, b"\xc1")
    message = _message(folder, _pack(unflatten(flat)))
    assert "8 invalid" in message
    for line in (
        "encoder/conv_in/bias: an array of shape (8,) and dtype float32 with 31 bytes of data "
        "instead of 32",
        "encoder/conv_in/kernel: an array of the unknown dtype b'float128'",
        "encoder/conv_out/bias: an array with the invalid shape [-1]",
        "encoder/conv_out/kernel: a damaged array record (not [shape, dtype, data])",
        "decoder/conv_in/bias: an undecodable array record",
        "decoder/conv_in/kernel: an array whose data is not a byte string",
        "decoder/conv_out/bias: a damaged chunked array",
        "quant_conv/bias: a damaged complex number",
    ):
        assert line in message, line
    assert "8 missing" in message  # the same paths, which hold no array


_FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(fraction=st.floats(0.0, 0.9999))
def test_fuzz_truncation(flax_folder, fraction):
    folder, data = flax_folder
    with _written(folder, data[: int(len(data) * fraction)]), pytest.raises(CheckpointError):
        eqx_vae.load_diffusers(folder)


@_FUZZ
@given(st.data())
def test_fuzz_garbled_bytes(flax_folder, data):
    """Any damage loads or raises CheckpointError, nothing else."""
    folder, original = flax_folder
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] ^= data.draw(st.integers(1, 255))
    with _written(folder, bytes(damaged)), contextlib.suppress(CheckpointError):
        eqx_vae.load_diffusers(folder)


@_FUZZ
@given(
    st.data(),
    st.sampled_from(["float64", "float16", "bfloat16", "int32", "uint8", "bool", "float32"]),
    st.lists(st.integers(0, 70), min_size=0, max_size=4),
    st.integers(-8, 8),
)
def test_fuzz_wrong_dtypes_shapes_and_sizes(flax_folder, model, data, dtype, shape, extra):
    folder, _ = flax_folder
    flat = flatten(eqx_vae.to_flax_params(model))
    path = data.draw(st.sampled_from(sorted(flat)))
    itemsize = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    size = max(0, int(np.prod(shape)) * itemsize + extra)
    if shape == list(flat[path].shape) and extra == 0 and dtype.startswith(("float", "bfloat")):
        shape = [*shape, 2]  # a right array: every floating dtype is accepted
    flat[path] = _record(shape, dtype, b"\0" * size)
    _message(folder, _pack(unflatten(flat)))  # raises CheckpointError, or fails
