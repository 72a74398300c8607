"""The API reference under docs/api/ documents every public name, and only those."""

import pathlib
import re
import types

import eqx_vae
import eqx_vae.interop
import eqx_vae.metrics
import eqx_vae.train


DOCS = pathlib.Path(__file__).parent.parent / "docs"
# Public, but not API: the version string and the sub-packages themselves (their names
# are documented one by one).
NOT_DOCUMENTED = {"eqx_vae.__version__"}


def public_names(module: types.ModuleType) -> set[str]:
    """The names a module re-exports (`from ._x import Y as Y`): everything not private
    and not a module."""
    return {
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def documented_names() -> dict[str, pathlib.Path]:
    """Every `::: name` directive under docs/api/, with the page it is on."""
    names = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for match in re.finditer(r"^:::\s+(\S+)\s*$", page.read_text(), re.MULTILINE):
            assert match.group(1) not in names, f"{match.group(1)} documented twice"
            names[match.group(1)] = page
    return names


def resolve(name: str) -> object:
    module, _, attribute = name.rpartition(".")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


def test_every_public_name_is_in_the_reference():
    public = set().union(
        *(public_names(m) for m in (eqx_vae, eqx_vae.interop, eqx_vae.metrics, eqx_vae.train))
    )
    # The loaders of eqx_vae.interop are also eqx_vae's: documented once, at the top.
    public -= {f"eqx_vae.interop.{n}" for n in dir(eqx_vae) if hasattr(eqx_vae.interop, n)}
    missing = sorted(public - NOT_DOCUMENTED - documented_names().keys())
    assert not missing, f"public but not under docs/api/: {missing}"


def test_every_documented_name_exists():
    stale = []
    for name, page in documented_names().items():
        try:
            resolve(name)
        except (ImportError, AttributeError):
            stale.append(f"{name} ({page.name})")
    assert not stale, f"documented but gone: {stale}"


def test_the_reference_documents_public_paths_only():
    private = [n for n in documented_names() if any(p.startswith("_") for p in n.split("."))]
    assert not private, private


def test_every_reference_page_is_in_the_navigation():
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    pages = [p.relative_to(DOCS).as_posix() for p in (DOCS / "api").glob("*.md")]
    pages += [p.relative_to(DOCS).as_posix() for p in (DOCS / "guides").glob("*.md")]
    assert all(f"'{page}'" in nav for page in pages), [p for p in pages if f"'{p}'" not in nav]
