"""Every ```python block of README.md and docs/ runs, so that the documentation cannot
fall behind the code.

The blocks of one file run in order in one namespace (a later block may use what an
earlier one defined), in a temporary working directory. A block that cannot run here
carries an HTML comment on the line above it, `<!-- not run: <reason> -->`, and a block
that takes long (compiling a training step) `<!-- slow: <reason> -->`, which makes its
page's test a slow one; a reason is required. Where a block loads published weights,
the `published_weights` fixture stands in for them.
"""

import os
import pathlib
import re
from typing import Any, NamedTuple

import jax
import pytest
from helpers import small_config

import eqx_vae
import eqx_vae.interop


ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"(?P<before>(?:^<!--[^\n]*-->\n)*)^```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL
)
MARK = re.compile(r"<!--\s*(?P<mark>not run|slow):(?P<reason>.*?)-->")


class Block(NamedTuple):
    line: int
    code: str
    not_run: bool
    slow: bool


def blocks(page: pathlib.Path) -> list[Block]:
    """Each ```python block of a page, with the marks on the lines above it."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        marks = {m.group("mark"): m.group("reason") for m in MARK.finditer(match["before"])}
        for mark, reason in marks.items():
            if not reason.strip():
                raise ValueError(f"{page.name}:{line}: `<!-- {mark}: -->` needs a reason")
        found.append(Block(line, match["code"], "not run" in marks, "slow" in marks))
    return found


def page_param(page: pathlib.Path):
    slow = any(block.slow for block in blocks(page))
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(page, marks=marks, id=page.relative_to(ROOT).as_posix())


def family(args: tuple, kwargs: dict[str, Any]) -> str:
    """The preset a loader call asks for: its `preset=`, or the family its path names."""
    if kwargs.get("preset") is not None:
        return kwargs["preset"]
    name = str(args[0]).lower() if args else ""
    for key, preset in [
        ("flux2", "flux2"),
        ("flux.2", "flux2"),
        ("flux", "flux1"),
        ("sdxl", "sdxl"),
        ("sd3", "sd3"),
        ("playground", "playground25"),
        ("sd2", "sd2"),
    ]:
        if key in name:
            return preset
    return "sd15"


def small_model(preset: str) -> eqx_vae.AutoencoderKL:
    """A two-level model with the latent channels and scaling of a published family."""
    published = getattr(eqx_vae.AutoencoderKLConfig, preset)()
    config = small_config(
        latent_channels=published.latent_channels,
        scaling_factor=published.scaling_factor,
        shift_factor=published.shift_factor,
        latents_mean=published.latents_mean,
        latents_std=published.latents_std,
        force_upcast=published.force_upcast,
        patch_size=published.patch_size,
    )
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


@pytest.fixture
def published_weights(monkeypatch):
    """Stands in for published weights, which cannot be downloaded here: the loaders
    check their arguments against the real signatures and return a small random model
    of the family asked for (its latent channels and scaling, a tiny architecture)."""
    import inspect

    for name in ("from_pretrained", "load_diffusers", "load_single_file"):
        real = getattr(eqx_vae, name)

        def stand_in(*args, _real=real, **kwargs):
            inspect.signature(_real).bind(*args, **kwargs)
            return small_model(family(args, kwargs))

        monkeypatch.setattr(eqx_vae, name, stand_in)
        monkeypatch.setattr(eqx_vae.interop, name, stand_in)


def test_blocks_are_found():
    assert sum(len(blocks(page)) for page in PAGES) >= 10


@pytest.mark.parametrize("page", [page_param(page) for page in PAGES])
def test_snippets_run(page, published_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    for line, code, not_run, _ in blocks(page):
        if not_run:
            continue
        padded = "\n" * (line - 1) + code  # tracebacks give the line in the page
        try:
            exec(compile(padded, str(page), "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.relative_to(ROOT)}:{line}: {error!r}") from error
    assert os.getcwd() == str(tmp_path)
