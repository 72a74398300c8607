"""`from_pretrained` with Hub ids, on a Hugging Face cache laid out as huggingface_hub
lays it out, offline."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import require, small_config

import eqx_vae
from eqx_vae import CheckpointError


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _make_cache(cache, repo_id: str, files: dict[str, bytes]):
    """`<cache>/models--org--name/{blobs,refs/main,snapshots/<commit>/...}`, with the
    snapshot's files symbolic links to content-addressed blobs."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / digest, link.parent), link)


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))


@pytest.fixture
def cache(tmp_path, model):
    require("huggingface_hub")
    folder = tmp_path / "saved"
    eqx_vae.save_diffusers(folder, model)
    files = {f"vae/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["model_index.json"] = json.dumps({"_class_name": "StableDiffusionPipeline"}).encode()
    _make_cache(tmp_path / "hub", "someone/pipeline", files)
    _make_cache(
        tmp_path / "hub", "someone/vae-only", {p.name: p.read_bytes() for p in folder.iterdir()}
    )
    return tmp_path / "hub"


def _same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_pipeline_repo_from_cache(cache, model):
    _same(
        model, eqx_vae.from_pretrained("someone/pipeline", cache_dir=cache, local_files_only=True)
    )


def test_vae_only_repo_from_cache(cache, model):
    _same(
        model, eqx_vae.from_pretrained("someone/vae-only", cache_dir=cache, local_files_only=True)
    )


def test_flax_only_repo_from_cache(tmp_path, model):
    """A repository of the Flax era, with `diffusion_flax_model.msgpack` alone."""
    require("huggingface_hub")
    require("msgpack")
    folder = tmp_path / "saved"
    eqx_vae.save_diffusers(folder, model, format="flax")
    files = {f"vae/{p.name}": p.read_bytes() for p in folder.iterdir()}
    _make_cache(tmp_path / "hub", "someone/flax-era", files)
    loaded = eqx_vae.from_pretrained(
        "someone/flax-era", cache_dir=tmp_path / "hub", local_files_only=True
    )
    _same(model, loaded)


def test_offline_mode_is_honoured(cache, model, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _same(model, eqx_vae.from_pretrained("someone/pipeline", cache_dir=cache))
    with pytest.raises(CheckpointError, match="Cannot fetch 'someone/absent'"):
        eqx_vae.from_pretrained("someone/absent", cache_dir=cache)


def test_local_paths(tmp_path, model):
    eqx_vae.save_diffusers(tmp_path / "vae", model)
    _same(model, eqx_vae.from_pretrained(tmp_path))
    _same(model, eqx_vae.from_pretrained(tmp_path / "vae"))
    with pytest.raises(CheckpointError, match=r"is a file; use `eqx_vae\.load_single_file`"):
        eqx_vae.from_pretrained(tmp_path / "vae" / "config.json")
    with pytest.raises(
        CheckpointError, match="neither an existing folder nor a Hub repository id"
    ):
        eqx_vae.from_pretrained(str(tmp_path / "missing"))
