"""The built-in model: its colours and the figures README gives for it."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import eqx_vae


# Saturated primaries and secondaries, greys, skin tones and a few colours of the
# ColorChecker chart (sRGB, 0-255).
CHART = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "dark grey": (64, 64, 64),
    "grey": (128, 128, 128),
    "light grey": (192, 192, 192),
    "white": (255, 255, 255),
    "dark skin": (115, 82, 68),
    "light skin": (194, 150, 130),
    "pale skin": (241, 194, 170),
    "deep skin": (80, 50, 35),
    "blue sky": (98, 122, 157),
    "foliage": (87, 108, 67),
    "navy": (20, 30, 90),
    "orange": (214, 126, 44),
    "purple": (94, 60, 108),
}
PATCH = 32
INSET = 6


def colour_chart() -> np.ndarray:
    """The chart as a `(3, H, W)` image in `[-1, 1]`, five patches a row."""
    columns = 5
    rows = -(-len(CHART) // columns)
    image = np.zeros((3, rows * PATCH, columns * PATCH), np.float32)
    for i, rgb in enumerate(CHART.values()):
        r, c = divmod(i, columns)
        colour = np.asarray(rgb, np.float32)[:, None, None] / 127.5 - 1.0
        image[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = colour
    return image


def test_builtin_model_reconstructs_a_colour_chart():
    """Every patch's mean colour, away from its edges, comes back within 0.08 per
    channel on the [-1, 1] scale, and most within 0.05 (the shipped weights: 17 of
    20; magenta 0.079, blue 0.059 and foliage 0.052 are the exceptions)."""
    model = eqx_vae.load_builtin()
    chart = colour_chart()
    recon = np.asarray(
        jnp.clip(eqx.filter_jit(lambda m, x: m(x))(model, jnp.asarray(chart)), -1, 1)
    )
    errors = {}
    for i, (name, rgb) in enumerate(CHART.items()):
        r, c = divmod(i, 5)
        patch = recon[
            :,
            r * PATCH + INSET : (r + 1) * PATCH - INSET,
            c * PATCH + INSET : (c + 1) * PATCH - INSET,
        ]
        expected = np.asarray(rgb, np.float32) / 127.5 - 1.0
        errors[name] = patch.mean(axis=(1, 2)) - expected
    worst = {name: float(np.abs(e).max()) for name, e in errors.items()}
    report = {k: round(v, 3) for k, v in worst.items()}
    assert max(worst.values()) < 0.08, report
    assert sum(v < 0.05 for v in worst.values()) >= 17, report


def test_readme_reports_the_evaluation_of_the_shipped_model():
    """README's table of held-out photographs is `runs/builtin/eval.json`, which
    `examples/train_builtin.py` wrote for the shipped weights."""
    import json
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    record = json.loads((root / "runs" / "builtin" / "eval.json").read_text())
    readme = (root / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in record["held_out"]:
            rows[cells[0], cells[1]] = cells
    for group, results in record["held_out"].items():
        for name, r in [*results.items(), ("mean", record["means"][group])]:
            cells = rows[group, name]
            assert cells[2] == f"{r['psnr']:.2f} dB" and cells[3] == f"{r['bicubic_psnr']:.2f} dB"
            assert cells[4] == f"{r['ssim']:.3f}" and cells[5] == f"{r['bicubic_ssim']:.3f}"
    # The model's own figure for Chelsea, recomputed from the shipped weights.
    model = eqx_vae.load_builtin()
    from PIL import Image

    image = np.asarray(Image.open(root / "eqx_vae" / "pretrained" / "chelsea.png"))
    x = jnp.asarray(np.transpose(image[:300, :448, :3], (2, 0, 1)), jnp.float32) / 127.5 - 1
    recon = jnp.clip(eqx.filter_jit(lambda m, x: m(x))(model, x), -1, 1)
    psnr = float(eqx_vae.metrics.psnr(x, recon))
    assert abs(psnr - record["held_out"]["scikit-image"]["chelsea"]["psnr"]) < 0.05
