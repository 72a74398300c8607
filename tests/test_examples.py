"""The examples, run as a user runs them: in a subprocess, at a tiny size."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import require


ROOT = pathlib.Path(__file__).parent.parent


def run_example(name: str, *args: object) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path},
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow  # about 35 s on two CPU cores, nearly all compilation
def test_latent_diffusion(tmp_path):
    require("optax")
    require("skimage")
    Image = require("PIL.Image")
    out = tmp_path / "ldm"
    run_example(
        "latent_diffusion.py",
        *("--out", out, "--steps", 3, "--batch-size", 4, "--crop-size", 16),
        *("--crops", 8, "--width", 8, "--sample-steps", 2),
    )
    for name in ("samples.png", "reference.png", "losses.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["seconds"] > 0
    for name in ("samples.png", "reference.png"):
        with Image.open(out / name) as grid:
            assert grid.size == (4 * 16, 4 * 16) and grid.mode == "RGB", name
