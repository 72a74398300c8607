import json
import os
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import require_torch, small_config
from make_golden import GOLDEN, PRESETS_WITH_GOLDEN, golden_lines

import eqx_vae
from eqx_vae import CheckpointError
from eqx_vae._serialisation import MAGIC


@pytest.fixture(scope="module")
def model():
    config = small_config(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def _assert_identical(a, b):
    assert a.config == b.config
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_bit_exact(model, tmp_path, dtype):
    m = jax.tree_util.tree_map(lambda a: a.astype(dtype), model)
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, m)
    loaded = eqx_vae.load(path)
    _assert_identical(m, loaded)
    assert os.listdir(tmp_path) == ["model.eqx"]


@pytest.mark.parametrize("preset", PRESETS_WITH_GOLDEN)
def test_golden_parameter_list(preset):
    """The parameter names, shapes and order of the published configurations. A
    difference means the checkpoint format changed (see make_golden.py)."""
    expected = (GOLDEN / f"parameters_{preset}.txt").read_text().splitlines()
    assert golden_lines(preset) == expected


@pytest.mark.torch
@pytest.mark.parametrize("preset", PRESETS_WITH_GOLDEN)
def test_golden_names_are_diffusers_names(preset):
    """Names and shapes of diffusers' state dict (FLUX.2's BatchNorm buffers included)."""
    torch, diffusers = require_torch()
    config = getattr(eqx_vae.AutoencoderKLConfig, preset)()
    with torch.device("meta"):
        theirs = getattr(diffusers, config.class_name).from_config(
            {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        )
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    ours = {}
    for line in (GOLDEN / f"parameters_{preset}.txt").read_text().splitlines():
        name, shape = line.split()
        shape = () if shape == "()" else tuple(int(s) for s in shape.split("x"))
        ours[name] = shape[:1] if name.endswith(".bias") and len(shape) == 3 else shape
    assert ours == their_shapes


def test_flux2_round_trip_keeps_the_statistics(tmp_path):
    """FLUX.2's BatchNorm statistics are leaves of the model: written and read with the
    parameters, the batch count as an integer."""
    config = small_config(patch_size=(2, 2), decoder_block_out_channels=(8, 16))
    model = eqx_vae.AutoencoderKL(config, key=jax.random.key(1))
    assert model.bn is not None
    model = eqx.tree_at(
        lambda m: (m.bn.running_mean, m.bn.running_var, m.bn.num_batches_tracked),
        model,
        (jnp.linspace(-1.0, 1.0, 16), jnp.linspace(0.5, 2.0, 16), jnp.asarray(77, jnp.int32)),
    )
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)
    loaded = eqx_vae.load(path)
    _assert_identical(model, loaded)
    assert loaded.bn is not None and loaded.bn.num_batches_tracked.dtype == jnp.int32
    # Plain Equinox serialisation into a skeleton of the same config.
    eqx.tree_serialise_leaves(tmp_path / "leaves.eqx", model)
    skeleton = eqx_vae.AutoencoderKL(config, key=jax.random.key(2))
    _assert_identical(model, eqx.tree_deserialise_leaves(tmp_path / "leaves.eqx", skeleton))


def test_save_is_atomic(model, tmp_path, monkeypatch):
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)
    before = path.read_bytes()
    other = jax.tree_util.tree_map(lambda a: a + 1, model)

    def crash(f, pytree):
        f.write(b"partial data")
        raise KeyboardInterrupt

    monkeypatch.setattr(eqx, "tree_serialise_leaves", crash)
    with pytest.raises(KeyboardInterrupt):
        eqx_vae.save(path, other)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.eqx"]


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="not an eqx_vae checkpoint"):
        eqx_vae.load(path)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(data[start : start + length])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(new)) + new + data[start + length :])


def test_other_format_version(model, tmp_path):
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)
    _rewrite_header(path, lambda h: h.update(format_version=2, eqx_vae_version="9.0"))
    with pytest.raises(
        CheckpointError, match=r"format version 2 \(by eqx_vae 9.0\).*reads format version 1"
    ):
        eqx_vae.load(path)


def test_structure_mismatch_is_refused(model, tmp_path):
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)

    def swap(h):
        p = h["parameters"]
        p[0], p[1] = p[1], p[0]

    _rewrite_header(path, swap)
    with pytest.raises(CheckpointError, match="does not match the AutoencoderKL structure"):
        eqx_vae.load(path)


def test_truncated_and_corrupted_files(model, tmp_path):
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for cut in [
        4,
        len(MAGIC) + 3,
        len(MAGIC) + 20,
        *rng.integers(100, len(data), 6).tolist(),
        len(data) - 1,
    ]:
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            eqx_vae.load(path)
    # A flipped bit in the parameter data is caught by the checksum.
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0x01  # inside the weights of a large convolution
    path.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="checksum"):
        eqx_vae.load(path)
    path.write_bytes(data + b"\x00")
    with pytest.raises(CheckpointError, match="after its checksum"):
        eqx_vae.load(path)


def test_truncated_file_names_the_parameter_it_breaks_off_in(model, tmp_path):
    from eqx_vae._state_dict import named_parameters

    names = [name for name, _ in named_parameters(model)]
    path = tmp_path / "model.eqx"
    eqx_vae.save(path, model)
    data = path.read_bytes()
    # Inside the last parameter: its last 8 bytes and the 32-byte checksum are cut off.
    path.write_bytes(data[:-40])
    with pytest.raises(CheckpointError) as info:
        eqx_vae.load(path)
    assert f"the parameter {names[-1]} could not be read" in str(info.value)
    assert "GetAttrKey" not in str(info.value)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"the parameter ([\w.]+) could not be read") as info:
        eqx_vae.load(path)
    assert info.match(r"the parameter (encoder|decoder)\.")
    named = str(info.value).split("the parameter ")[1].split(" ")[0]
    assert named in names and "Key" not in str(info.value)


def test_written_files_get_the_usual_permissions(model, tmp_path):
    (tmp_path / "plain").write_bytes(b"")
    eqx_vae.save(tmp_path / "model.eqx", model)
    eqx_vae.save_diffusers(tmp_path / "folder", model)
    expected = (tmp_path / "plain").stat().st_mode
    assert (tmp_path / "model.eqx").stat().st_mode == expected
    for path in (tmp_path / "folder").iterdir():
        assert path.stat().st_mode == expected, path
