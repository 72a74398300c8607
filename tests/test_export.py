"""`eqx_vae.export` and `load_exported`: `jax.export` programs with a symbolic batch,
the parameters stored once beside them, read and run with JAX alone."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import equinox as eqx
import jax
import jax.export  # a submodule to import explicitly under older jax versions
import numpy as np
import pytest
from helpers import small_config

import eqx_vae
from eqx_vae.cli import main


READER = pathlib.Path(eqx_vae.__file__).parent / "_exported_reader.py"
SIZE = (32, 32)


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL.from_config(small_config(), key=jax.random.key(0))


@pytest.fixture(scope="module")
def artefact(model, tmp_path_factory):
    """Encode and decode at 32x32 and 32x48, float in and out."""
    path = tmp_path_factory.mktemp("export") / "vae.zip"
    eqx_vae.export(model, path, resolutions=[32, (32, 48)])
    return path


@pytest.fixture(scope="module")
def loaded(artefact):
    return eqx_vae.load_exported(artefact)


def latents(batch: int, size=SIZE) -> np.ndarray:
    shape = (batch, 4, size[0] // 2, size[1] // 2)
    return np.asarray(jax.random.normal(jax.random.key(batch), shape), np.float32)


def images(batch: int, size=SIZE) -> np.ndarray:
    shape = (batch, 3, *size)
    x = jax.random.uniform(jax.random.key(batch), shape, minval=-1.0, maxval=1.0)
    return np.asarray(x, np.float32)


def assert_same(actual, expected):
    """Bit-equal, or within 1e-6 of the largest value (floating-point reordering)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(actual - expected))) <= 1e-6 * scale


def test_the_header_describes_every_program_and_the_parameters_once(model, artefact, loaded):
    header = loaded.header
    assert header["format"] == "eqx_vae.exported" and header["format_version"] == 1
    assert header["config"] == model.config.to_dict()
    assert header["eqx_vae_version"] == eqx_vae.__version__
    assert header["jax_version"] == jax.__version__
    assert header["platforms"] == [jax.export.default_export_platform()]
    assert header["compiler_options"] == {
        header["platforms"][0]: eqx_vae.compiler_options(jax.default_backend())
    }
    supported = range(
        jax.export.minimum_supported_calling_convention_version,
        jax.export.maximum_supported_calling_convention_version + 1,
    )
    assert header["calling_convention_version"] in supported
    entries = {(p["method"], tuple(p["size"])): p for p in header["programs"]}
    assert len(entries) == 4
    decode = entries["decode", (32, 48)]
    assert decode["input"] == {"shape": ["b", 4, 16, 24], "dtype": "float32"}
    assert decode["outputs"] == [{"shape": ["b", 3, 32, 48], "dtype": "float32"}]
    encode = entries["encode", (32, 32)]
    assert encode["input"] == {"shape": ["b", 3, 32, 32], "dtype": "float32"}
    assert encode["outputs"] == [{"shape": ["b", 4, 16, 16], "dtype": "float32"}] * 2
    with zipfile.ZipFile(artefact) as archive:
        members = archive.namelist()
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    assert sum(m.startswith("parameters/") for m in members) == len(leaves)
    assert sorted(p["member"] for p in header["programs"]) == sorted(
        m for m in members if m.startswith("programs/")
    )
    assert len(loaded.programs) == 4


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_decode_and_encode_equal_the_compiled_programs(model, loaded, batch):
    z = latents(batch)
    expected = eqx_vae.compile(model, "decode", SIZE, batch=batch)(z)
    assert_same(loaded.decode(32)(z), expected)
    x = images(batch)
    posterior = eqx_vae.compile(model, "encode", SIZE, batch=batch)(x)
    mean, logvar = loaded.encode(SIZE)(x)
    assert_same(mean, posterior.mean)
    assert_same(logvar, posterior.logvar)


def test_a_program_checks_its_input(loaded):
    with pytest.raises(ValueError, match=r"shape \('batch', 4, 16, 24\)"):
        loaded.decode((32, 48))(latents(1))
    with pytest.raises(ValueError, match="No decode program for 64x64 images"):
        loaded.decode(64)


def test_pixels_are_the_host_side_conversion(model, loaded, tmp_path):
    path = tmp_path / "pixels.zip"
    header = eqx_vae.export(
        model, path, resolutions=[32], methods=["decode", "encode"], pixels=True
    )
    decode, encode = header["programs"]
    assert decode["outputs"] == [{"shape": ["b", 32, 32, 3], "dtype": "uint8"}]
    assert encode["input"] == {"shape": ["b", 32, 32, 3], "dtype": "uint8"}
    z = latents(1)
    pixels = eqx_vae.load_exported(path).decode(32)(z)
    image = np.asarray(loaded.decode(32)(z))
    expected = np.clip((image + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(pixels), expected.transpose(0, 2, 3, 1))


def test_the_auto_algorithms_are_this_backends_only_for_this_platform_alone(model, tmp_path):
    here = jax.export.default_export_platform()
    other = "tpu" if here != "tpu" else "cpu"
    path = tmp_path / "vae.zip"
    header = eqx_vae.export(model, path, resolutions=[32], methods=["decode"])
    assert header["algorithms"] == {"conv": "auto", "attention": "auto"}
    header = eqx_vae.export(model, path, resolutions=[32], methods=["decode"], platforms=[other])
    assert header["platforms"] == [other]
    assert header["algorithms"] == {"conv": "direct", "attention": "blocked"}
    policy = eqx_vae.Policy(conv="winograd")
    header = eqx_vae.export(
        model, path, resolutions=[32], methods=["decode"], platforms=[other], policy=policy
    )
    assert header["algorithms"] == {"conv": "winograd", "attention": "blocked"}


# Runs the reader from its file, with eqx_vae and Equinox unimportable.
STANDALONE = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("eqx_vae", "equinox"):
                raise ImportError(f"{name} must not be imported here")
            return None

    sys.meta_path.insert(0, Refuse())
    reader_file, artefact, latents, out = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("exported_reader", reader_file)
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    model = reader.load_exported(artefact)
    np.save(out, np.asarray(model.decode(32)(np.load(latents))))
    assert not any(m.split(".")[0] in ("eqx_vae", "equinox") for m in sys.modules)
    """
)


def test_the_reader_runs_without_eqx_vae_or_equinox(loaded, artefact, tmp_path):
    z = latents(2)
    # Compiled here first, so that the subprocess finds the program in the tests'
    # persistent compilation cache.
    expected = loaded.decode(32)(z)
    np.save(tmp_path / "z.npy", z)
    script = tmp_path / "serve.py"
    script.write_text(STANDALONE)
    # As many CPU devices as here (conftest's eight): XLA splits the work by them, and
    # the results are bit-equal only when the split is the same.
    env = {
        **os.environ,
        "JAX_PLATFORMS": jax.default_backend(),
        "JAX_NUM_CPU_DEVICES": str(len(jax.devices("cpu"))),
    }
    result = subprocess.run(
        [sys.executable, script, READER, artefact, tmp_path / "z.npy", tmp_path / "out.npy"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def with_header(source: pathlib.Path, destination: pathlib.Path, **changes) -> pathlib.Path:
    """A copy of an exported model with fields of its header changed."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(destination, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "header.json":
                data = json.dumps({**json.loads(data), **changes}).encode()
            new.writestr(item, data)
    return destination


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 99}, r"format version 99 .* reads version 1\. Re-export"),
        ({"platforms": ["tpu"]}, r"programs for tpu .* Run it on one of tpu, or re-export"),
        (
            {"calling_convention_version": 1, "jax_version": "0.0.1"},
            r"exported with eqx_vae .*, jax 0\.0\.1, in jax.export calling convention version 1; "
            r"this process runs jax .* Re-export the model with jax",
        ),
    ],
    ids=["format", "platform", "calling-convention"],
)
def test_an_artefact_that_cannot_run_here_is_refused_clearly(artefact, tmp_path, changes, message):
    if changes.get("platforms") == [jax.export.default_export_platform()]:
        pytest.skip("this process runs on the platform the test pretends is missing")
    path = with_header(artefact, tmp_path / "changed.zip", **changes)
    with pytest.raises(eqx_vae.IncompatibleArtefactError, match=message):
        eqx_vae.load_exported(path)


def test_arguments_are_checked(model, tmp_path, without_typechecks):
    """Without the tests' runtime type checks, which reject some of these first."""
    path = tmp_path / "vae.zip"
    for kwargs, message in [
        ({"resolutions": 32}, "must be a list of image sizes"),
        ({"resolutions": [33]}, "multiple of the model's spatial factor 2"),
        ({"resolutions": [32, (32, 32)]}, r"lists \[\(32, 32\)\] more than once"),
        ({"resolutions": [32], "methods": ["sample"]}, "`methods` must be"),
        ({"resolutions": [32], "platforms": ["gpu"]}, "'gpu' is 'cuda' or 'rocm'"),
        ({"resolutions": [32], "pixels": 1}, "`pixels` must be a bool"),
        (
            {"resolutions": [32], "policy": eqx_vae.Policy(axis_name="rows")},
            "runs whole images on one device",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            eqx_vae.export(model, path, **kwargs)
    with pytest.raises(TypeError, match="must be an AutoencoderKL"):
        eqx_vae.export(model.decoder, path, resolutions=[32])
    assert not path.exists()


def test_the_command_line_writes_a_file_that_loads(model, tmp_path, capsys):
    eqx_vae.save(tmp_path / "vae.eqx", model)
    out = tmp_path / "vae.zip"
    argv = ["export", "--model", tmp_path / "vae.eqx", "--resolutions", "32,32x48"]
    assert main([*map(str, argv), "--methods", "decode", "--dtype", "bfloat16", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decode 32x48: (b, 4, 16, 24) float32 -> (b, 3, 32, 48) float32" in printed
    assert f"wrote {out} (" in printed and "2 programs" in printed
    exported = eqx_vae.load_exported(out)
    assert [(p.method, p.size) for p in exported.programs] == [
        ("decode", (32, 32)),
        ("decode", (32, 48)),
    ]
    assert exported.header["compute_dtype"] == "bfloat16"
    assert main(["export", "--resolutions", "32,0,ax2", "--methods", "sample", str(out)]) == 1
    error = capsys.readouterr().err
    assert "--resolutions 0: must be N" in error and "--resolutions ax2" in error
    assert "--methods sample: must be one of encode, decode" in error
