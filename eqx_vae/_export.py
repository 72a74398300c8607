"""Exporting the encoder and decoder as `jax.export` programs, with the parameters
beside them, in one file that JAX alone can serve (see `_exported_reader.py`)."""

import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any, cast

import equinox as eqx
import jax
import jax.export  # a submodule to import explicitly under older jax versions
import jax.numpy as jnp
import numpy as np

from ._autoencoder import AutoencoderKL
from ._custom_types import DTypeLike
from ._exported_reader import FORMAT, FORMAT_VERSION, HEADER
from ._files import atomic_write
from ._policy import Policy
from ._serving import _METHODS, Method, check_size, forward, input_spec
from ._state_dict import named_parameters
from ._version import __version__
from ._xla import compiler_options


# The platforms `jax.export` lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export(
    model: AutoencoderKL,
    path: str | os.PathLike[str],
    *,
    resolutions: Sequence[int | Sequence[int]],
    methods: Sequence[str] = ("encode", "decode"),
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
    pixels: bool = False,
    platforms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes `model`'s encoder and decoder as `jax.export` programs, one per method and
    image size, each for any batch size, to one file that needs only JAX to run (see
    [`eqx_vae.load_exported`][]).

    The parameters are arguments of the programs, not constants inside them: the file
    holds them once, however many programs it has.

    **Arguments:**

    - `model`: the autoencoder.
    - `path`: the file to write (a zip; conventionally ending in `.zip`).
    - `resolutions`: the image sizes in pixels: an int `n` for `n x n`, or `(height,
        width)`; multiples of the spatial factor.
    - `methods`: `"encode"` (images to the posterior's mean and log-variance) and/or
        `"decode"` (latents to images).
    - `dtype`, `policy`: the compute dtype and policy, as in
        [`eqx_vae.AutoencoderKL.encode`][]; fixed in the programs.
    - `pixels`: exchange images as 8-bit pixels, channels last, as in
        [`eqx_vae.compile`][]: the encoder takes `uint8` `(B, H, W, C)` and the decoder
        returns it.
    - `platforms`: the platforms to export for (`"cpu"`, `"cuda"`, `"rocm"`, `"tpu"`);
        by default the one this process runs on. The `"auto"` algorithms of `policy`
        are chosen for this process's backend; exporting for other platforms uses the
        plain ones (`conv="direct"`, `attention="blocked"`) where `policy` leaves them
        to `"auto"`, since the measured fast paths hold on their own backend only.

    **Returns:**

    The header written to the file (a dict; see the file format in the serving guide).

    !!! Example

        ```python
        eqx_vae.export(model, "vae.zip", resolutions=[512, (512, 768)], dtype=jnp.bfloat16)
        vae = eqx_vae.load_exported("vae.zip")  # or from a copy of _exported_reader.py
        images = vae.decode(512)(latents)  # any batch: (B, 4, 64, 64) -> (B, 3, 512, 512)
        ```
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"`model` must be an AutoencoderKL, got {type(model).__name__}.")
    sizes = _sizes(model, resolutions)
    kinds = _methods(methods)
    platforms = _platforms(platforms)
    policy = _portable(model.resolve_policy(policy, dtype=dtype), platforms)
    if not isinstance(pixels, bool):
        raise ValueError(f"`pixels` must be a bool, got {pixels!r}.")
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = [name for name, _ in named_parameters(model)]
    programs: list[tuple[dict[str, Any], bytes]] = []
    convention = None
    for method in kinds:
        run = _batched(method, policy, pixels, treedef, static)
        for size in sizes:
            x = input_spec(model, method, size, None, jnp.float32, pixels)
            exported = _export_one(run, leaves, x, platforms)
            convention = exported.calling_convention_version  # one per jax version
            entry = _program_entry(method, size, pixels, exported)
            programs.append((entry, bytes(exported.serialize())))
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "eqx_vae_version": __version__,
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "platforms": list(platforms),
        "calling_convention_version": convention,
        "compiler_options": {p: _options(p) for p in platforms},
        "config": model.config.to_dict(),
        "compute_dtype": None if policy.dtype is None else np.dtype(policy.dtype).name,
        "algorithms": {"conv": policy.conv, "attention": policy.attention},
        "pixels": pixels,
        "parameters": [
            _parameter_entry(i, name, leaf)
            for i, (name, leaf) in enumerate(zip(names, leaves, strict=True))
        ],
        "programs": [entry for entry, _ in programs],
    }
    _write(path, header, leaves, programs)
    return header


def _batched(method: Method, policy: Policy, pixels: bool, treedef: Any, static: Any) -> Any:
    """`f(parameters, x)` of a batch `x`, the parameters a flat list; the encoder
    returns the posterior's `(mean, logvar)`."""
    one = forward(method, policy, pixels=pixels)

    def run(parameters: list[jax.Array], x: jax.Array) -> Any:
        model = eqx.combine(jax.tree_util.tree_unflatten(treedef, parameters), static)
        out = jax.vmap(lambda item: one(model, item))(x)
        return (out.mean, out.logvar) if method == "encode" else out

    return run


def _export_one(
    run: Any, leaves: list[jax.Array], x: jax.ShapeDtypeStruct, platforms: tuple[str, ...]
) -> Any:
    """`run` exported for a symbolic batch `b` of inputs like `x`."""
    (batch,) = jax.export.symbolic_shape("b")
    parameters = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    batched = jax.ShapeDtypeStruct((batch, *x.shape), x.dtype)
    return jax.export.export(jax.jit(run), platforms=platforms)(parameters, batched)


def _sizes(model: AutoencoderKL, resolutions: Any) -> list[tuple[int, int]]:
    if isinstance(resolutions, int | str) or not isinstance(resolutions, Sequence):
        raise ValueError(
            "`resolutions` must be a list of image sizes (an int n for n x n, or "
            f"(height, width)), got {resolutions!r}; write [{resolutions!r}] for one."
        )
    if not resolutions:
        raise ValueError("`resolutions` is empty: give at least one image size.")
    sizes = []
    for r in resolutions:
        size = (int(r), int(r)) if isinstance(r, int | np.integer) else tuple(r)
        sizes.append(check_size(model, size, f"The resolution {r!r}"))
    repeated = sorted({s for s in sizes if sizes.count(s) > 1})
    if repeated:
        raise ValueError(f"`resolutions` lists {repeated} more than once.")
    return sizes


def _methods(methods: Any) -> list[Method]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in _METHODS]
    if not methods or bad or len(set(methods)) != len(methods):
        raise ValueError(
            f"`methods` must be 'encode', 'decode' or both, each once, got {methods!r}."
        )
    return cast(list[Method], methods)


def _platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
    if platforms is None:
        return (jax.export.default_export_platform(),)
    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad or len(set(platforms)) != len(platforms):
        hint = " ('gpu' is 'cuda' or 'rocm')" if "gpu" in platforms else ""
        raise ValueError(
            f"`platforms` must be distinct names out of {PLATFORMS}, got {platforms!r}{hint}."
        )
    return platforms


def _portable(policy: Policy, platforms: tuple[str, ...]) -> Policy:
    """`policy`, checked for export, its `"auto"` algorithms made plain unless the
    programs are for this process's platform only."""
    if policy.axis_name is not None:
        raise ValueError(
            "An exported program runs whole images on one device; `policy.axis_name` "
            f"({policy.axis_name!r}) is for `eqx_vae.sharded_decode` and friends."
        )
    if policy.norm_stats is not None:
        raise ValueError(
            "`policy.norm_stats` would be baked into the exported programs as constants; "
            "it is for tiled processing (`eqx_vae.tiled_decode`), not for export."
        )
    if platforms == (jax.export.default_export_platform(),):
        return policy
    return policy.replace(
        conv="direct" if policy.conv == "auto" else policy.conv,
        attention="blocked" if policy.attention == "auto" else policy.attention,
    )


def _options(platform: str) -> dict[str, Any]:
    """The recommended compiler options of a platform (the backend names `cuda` and
    `rocm` `gpu`)."""
    return compiler_options("gpu" if platform in ("cuda", "rocm") else platform)


def _jaxlib_version() -> str:
    import jaxlib.version

    return jaxlib.version.__version__


def _shape(shape: Sequence[Any]) -> list[int | str]:
    return [str(d) if jax.export.is_symbolic_dim(d) else int(d) for d in shape]


def _program_entry(
    method: str, size: tuple[int, int], pixels: bool, exported: Any
) -> dict[str, Any]:
    x = exported.in_avals[-1]
    return {
        "method": method,
        "size": list(size),
        "pixels": pixels,
        "member": f"programs/{method}_{size[0]}x{size[1]}.jax_exported",
        "input": {"shape": _shape(x.shape), "dtype": np.dtype(x.dtype).name},
        "outputs": [
            {"shape": _shape(a.shape), "dtype": np.dtype(a.dtype).name} for a in exported.out_avals
        ],
    }


def _parameter_entry(index: int, name: str, leaf: jax.Array) -> dict[str, Any]:
    return {
        "name": name,
        "member": f"parameters/{index:05d}.npy",
        "shape": list(leaf.shape),
        "dtype": np.dtype(leaf.dtype).name,
    }


def _write(
    path: str | os.PathLike[str],
    header: dict[str, Any],
    leaves: list[jax.Array],
    programs: list[tuple[dict[str, Any], bytes]],
) -> None:
    """The zip, written atomically: the header first, so that a reader can judge the
    file before reading the rest."""
    with (
        atomic_write(path) as f,
        zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        archive.writestr(HEADER, json.dumps(header, indent=2), zipfile.ZIP_DEFLATED)
        for entry, leaf in zip(header["parameters"], leaves, strict=True):
            array = np.asarray(leaf)
            if array.dtype.kind == "V":  # bfloat16, float8: no dtype of their own in .npy
                array = array.view(f"u{array.dtype.itemsize}")
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            archive.writestr(entry["member"], buffer.getvalue())
        for entry, blob in programs:
            archive.writestr(entry["member"], blob, zipfile.ZIP_DEFLATED)
