"""The safetensors reader and writer: agreement with the reference implementation, and
a clear error for every kind of damaged file."""

import contextlib
import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from helpers import require_torch, small_config
from hypothesis import HealthCheck, given, settings, strategies as st

import eqx_vae
from eqx_vae import CheckpointError
from eqx_vae.interop import SafetensorsFile, write_safetensors


TENSORS = {
    "a": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b.half": np.linspace(-2, 2, 5).astype(np.float16),
    "c.bf16": np.linspace(-2, 2, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
    "d.int": np.arange(4, dtype=np.int64),
    "e.scalar": np.array(3.5, np.float64),
}


def _read_all(path):
    with SafetensorsFile(path) as f:
        return {name: ref.read() for name, ref in f.items()}, f.metadata


def test_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, TENSORS, metadata={"format": "pt"})
    tensors, metadata = _read_all(path)
    assert metadata == {"format": "pt"}
    assert tensors.keys() == TENSORS.keys()
    for name, value in TENSORS.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape
        np.testing.assert_array_equal(tensors[name], value)
        assert (
            tensors[name].flags.writeable and tensors[name].flags.owndata is False
        )  # a view of a fresh buffer
    assert (len(path.read_bytes()) - 8 - struct.unpack("<Q", path.read_bytes()[:8])[0]) == sum(
        v.nbytes for v in TENSORS.values()
    )


@pytest.mark.torch
def test_agrees_with_the_reference_implementation(tmp_path):
    require_torch()  # the parity extra brings the safetensors package
    import safetensors.numpy

    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "theirs.safetensors"
    plain = {k: v for k, v in TENSORS.items() if v.dtype != ml_dtypes.bfloat16}
    write_safetensors(ours, plain)
    for name, value in safetensors.numpy.load_file(ours).items():
        np.testing.assert_array_equal(value, plain[name])
    safetensors.numpy.save_file(plain, theirs, metadata={"x": "y"})
    tensors, metadata = _read_all(theirs)
    assert metadata == {"x": "y"}
    for name, value in plain.items():
        np.testing.assert_array_equal(tensors[name], value)


def _write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "claims bytes"),
        (
            {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "needs 12 bytes",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 12,
            "cover 8 bytes",
        ),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        (
            {
                "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "gap",
        ),
        ({"x": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "F8_E9"),
        (
            {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "damaged header entry",
        ),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "damaged header entry"),
        ({"x": [1, 2]}, b"", "damaged header entry"),
        ({"__metadata__": {"a": 1}}, b"", "metadata"),
    ],
)
def test_lying_headers(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="only 3 bytes"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="damaged safetensors header"):
        SafetensorsFile(path)


def test_file_truncated_after_opening(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, TENSORS)
    with SafetensorsFile(path) as f:
        data = path.read_bytes()
        path.write_bytes(data[:-10])
        with pytest.raises(CheckpointError, match="truncated inside tensor"):
            for ref in f.values():
                ref.read()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    eqx_vae.save_diffusers(
        folder,
        eqx_vae.AutoencoderKL(
            small_config(block_out_channels=(8,), norm_num_groups=4), key=jax.random.key(0)
        ),
    )
    return folder, (folder / "diffusion_pytorch_model.safetensors").read_bytes()


def _load_or_error(folder):
    """Loading either works or raises CheckpointError; anything else fails the test."""
    with contextlib.suppress(CheckpointError):
        eqx_vae.load_diffusers(folder)


_FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(fraction=st.floats(0.0, 0.9999))
def test_fuzz_truncation(model_file, fraction):
    folder, data = model_file
    target = folder / "diffusion_pytorch_model.safetensors"
    try:
        target.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError):
            eqx_vae.load_diffusers(folder)
    finally:
        target.write_bytes(data)


@_FUZZ
@given(st.data())
def test_fuzz_flipped_header_bytes(model_file, data):
    folder, original = model_file
    (length,) = struct.unpack("<Q", original[:8])
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, 8 + length - 1))
        damaged[position] ^= data.draw(st.integers(1, 255))
    target = folder / "diffusion_pytorch_model.safetensors"
    try:
        target.write_bytes(bytes(damaged))
        _load_or_error(folder)
    finally:
        target.write_bytes(original)


@_FUZZ
@given(
    st.data(),
    st.sampled_from(["F64", "F16", "BF16", "I32", "U8", "BOOL", "F32"]),
    st.lists(st.integers(0, 70), min_size=0, max_size=4),
)
def test_fuzz_wrong_dtypes_and_shapes(model_file, data, dtype, shape):
    folder, original = model_file
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8 : 8 + length])
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    header[name]["dtype"] = dtype
    header[name]["shape"] = shape
    raw = json.dumps(header).encode()
    target = folder / "diffusion_pytorch_model.safetensors"
    try:
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + original[8 + length :])
        with pytest.raises(CheckpointError):
            eqx_vae.load_diffusers(folder)
    finally:
        target.write_bytes(original)
