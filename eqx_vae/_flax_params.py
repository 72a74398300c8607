"""The parameter layout of diffusers' `FlaxAutoencoderKL` (and maxdiffusion's, which is
the same): a nested dict of module names whose list indices are joined with an
underscore (`encoder/down_blocks_0/resnets_1/conv1/kernel`), convolution kernels in HWIO,
Dense kernels as `(in, out)`, GroupNorm weights named `scale`, and the attention
projections named `query`, `key`, `value` and `proj_attn`.

Each Flax path is derived from the diffusers name of the same parameter, so loading is
a renaming and transposition in front of the state-dict loader."""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ._autoencoder import AutoencoderKL
from ._config import AutoencoderKLConfig
from ._custom_types import DTypeLike
from ._host_arrays import aligned_empty
from ._state_dict import (
    FLOATING,
    abstract_model,
    dtype_name,
    fill_skeleton,
    named_parameters,
    raise_if_problems,
    shape_of,
    torch_shape,
)


_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value"}
# A parameter tree nested deeper than this is damaged, not a model's (five maps deep).
_MAX_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class FlaxParameter:
    """One parameter in both layouts: its diffusers `name` and PyTorch shape, its Flax
    `path` and shape, and `axes`, the transposition from the Flax array to PyTorch's
    (`None` where the two hold the same values in the same order)."""

    name: str
    torch_shape: tuple[int, ...]
    path: str
    shape: tuple[int, ...]
    axes: tuple[int, ...] | None


def flax_path(name: str, ndim: int) -> str:
    """The Flax path of the diffusers parameter `name` of `ndim` dimensions (as PyTorch
    stores it): `encoder.mid_block.attentions.0.to_out.0.weight` is
    `encoder/mid_block/attentions_0/proj_attn/kernel`."""
    *modules, leaf = name.split(".")
    parts: list[str] = []
    for module in modules:
        if module.isdigit() and parts:
            owner = parts.pop()
            parts.append("proj_attn" if owner == "to_out" else f"{owner}_{module}")
        else:
            parts.append(_ATTENTION_NAMES.get(module, module))
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return "/".join([*parts, leaf])


def _parameter(name: str, shape: tuple[int, ...]) -> FlaxParameter:
    shape = torch_shape(name, shape)
    if len(shape) == 4:  # convolution: OIHW <-> HWIO
        to_flax: tuple[int, ...] | None = (2, 3, 1, 0)
        axes: tuple[int, ...] | None = (3, 2, 0, 1)
    elif len(shape) == 2:  # Dense: (out, in) <-> (in, out)
        to_flax = axes = (1, 0)
    else:
        to_flax = axes = None
    flax_shape = shape if to_flax is None else tuple(shape[i] for i in to_flax)
    return FlaxParameter(name, shape, flax_path(name, len(shape)), flax_shape, axes)


@functools.lru_cache(maxsize=16)
def flax_layout(config: AutoencoderKLConfig) -> tuple[FlaxParameter, ...]:
    """Every parameter of the model `config` describes, in pytree order."""
    return tuple(
        _parameter(name, leaf.shape) for name, leaf in named_parameters(abstract_model(config))
    )


class DamagedArray:
    """What a file reader puts in place of an array it could not decode, so that every
    damaged array of a file is reported together with the other problems."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"DamagedArray({self.reason!r})"


class FlaxArray:
    """A Flax parameter seen in PyTorch's layout: `shape` and `dtype` describe the
    transposed array, and `read()` returns it as a new aligned array (which the loader
    adopts without another copy), then lets go of the Flax array, so that a loaded file
    is not held twice."""

    __slots__ = ("_axes", "_source", "dtype", "shape")

    def __init__(self, source: Any, axes: tuple[int, ...], shape: tuple[int, ...]):
        self._source = source
        self._axes = axes
        self.dtype = np.dtype(source.dtype)
        self.shape = shape

    def read(self) -> np.ndarray:
        if self._source is None:
            raise RuntimeError("A FlaxArray is read once.")
        source = np.asarray(self._source)
        self._source = None
        out = aligned_empty(self.shape, source.dtype)
        np.copyto(out, source.transpose(self._axes))
        return out


def flax_leaves(params: Any) -> tuple[dict[str, Any], list[str]]:
    """The arrays of a nested mapping (dicts or flax `FrozenDict`s, with or without the
    outer `{"params": ...}`) by `/`-joined path, and a line for every leaf that is not
    an array."""
    if (
        isinstance(params, Mapping)
        and set(params) == {"params"}
        and isinstance(params["params"], Mapping)
    ):
        params = params["params"]
    if not isinstance(params, Mapping):
        raise TypeError(
            "`params` must be a nested mapping of parameters, as `FlaxAutoencoderKL."
            f"init_weights` returns it; got {type(params).__name__}."
        )
    leaves: dict[str, Any] = {}
    problems: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", params, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        for key, value in node.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if not isinstance(key, str):
                problems.append(f"{path}: the key {key!r} is not a string")
            elif isinstance(value, Mapping):
                if depth >= _MAX_DEPTH:
                    problems.append(f"{path}: nested more than {_MAX_DEPTH} levels deep")
                else:
                    stack.append((path, value, depth + 1))
            elif isinstance(value, (np.ndarray, np.generic, jax.Array)):
                leaves[path] = value
            else:
                problems.append(f"{path}: {_describe(value)}")
    return leaves, problems


def _describe(value: Any) -> str:
    if isinstance(value, jax.ShapeDtypeStruct):
        return "a jax.ShapeDtypeStruct, which holds no values"
    if isinstance(value, DamagedArray):
        return value.reason
    return f"not an array but {type(value).__name__}"


def load_flax_leaves(
    leaves: dict[str, Any],
    problems: list[str],
    config: AutoencoderKLConfig,
    *,
    dtype: DTypeLike | None,
    check_finite: bool,
) -> AutoencoderKL:
    """Builds the model from Flax arrays by path (see [`eqx_vae.from_flax_params`][]);
    `problems` are the tree's own, reported with the rest. `leaves` is emptied: each
    array is let go of once it is converted."""
    headline = "Cannot load the Flax parameters into AutoencoderKL"
    problems = list(problems)
    layout = flax_layout(config)
    missing: list[str] = []
    misshaped: list[str] = []
    for parameter in layout:
        if parameter.path not in leaves:
            missing.append(f"{parameter.path}: expected shape {parameter.shape}")
            continue
        value = leaves[parameter.path]
        shape = shape_of(value)
        if shape != parameter.shape:
            misshaped.append(
                f"{parameter.path}: params have shape {shape}, model expects {parameter.shape}"
            )
        elif dtype_name(value) not in FLOATING:
            problems.append(f"{parameter.path}: dtype {dtype_name(value)} is not floating point")
    known = {parameter.path for parameter in layout}
    unexpected = [
        f"{path}: shape {shape_of(value)}" for path, value in leaves.items() if path not in known
    ]
    raise_if_problems(
        headline,
        config,
        missing=missing,
        unexpected=unexpected,
        misshaped=misshaped,
        invalid=problems,
    )
    tensors: dict[str, Any] = {}
    for parameter in layout:
        value = leaves.pop(parameter.path)
        if parameter.axes is None:
            tensors[parameter.name] = value
        else:
            tensors[parameter.name] = FlaxArray(value, parameter.axes, parameter.torch_shape)
        del value
    return fill_skeleton(
        tensors,
        config,
        dtype=dtype,
        check_finite=check_finite,
        headline=headline,
        labels={parameter.name: parameter.path for parameter in layout},
    )


def from_flax_params(
    params: Mapping[str, Any],
    config: AutoencoderKLConfig | Mapping[str, Any],
    *,
    dtype: DTypeLike | None = None,
    check_finite: bool = False,
) -> AutoencoderKL:
    """Builds a model from the parameters of diffusers' `FlaxAutoencoderKL` (or
    maxdiffusion's, which has the same layout).

    Flax paths and layouts are translated to the model's: list indices joined with an
    underscore (`encoder/down_blocks_0/resnets_1`), convolution kernels in HWIO, Dense
    kernels as `(in, out)`, GroupNorm `scale`, and the attention projections `query`,
    `key`, `value` and `proj_attn`. Paths and shapes are all checked before any data is
    converted; flax itself is not needed.

    **Arguments:**

    - `params`: the parameter tree, as `FlaxAutoencoderKL.init_weights` returns it or
        `FlaxAutoencoderKL.from_pretrained` loads it: nested dicts or flax `FrozenDict`s
        of NumPy or JAX arrays, with or without the outer `{"params": ...}`.
    - `config`: the model's [`eqx_vae.AutoencoderKLConfig`][], or the contents of its
        `config.json`. diffusers' `FlaxAutoencoderKL` always has both quant convs and
        mid-block attention; maxdiffusion's may leave the quant convs out
        (`use_quant_conv`, `use_post_quant_conv`).
    - `dtype`: parameter dtype of the model; float32 by default, as for every loader.
    - `check_finite`: also refuse parameters that contain NaN or infinity.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][].

    **Raises:**

    [`eqx_vae.CheckpointError`][] listing every missing, unexpected, mis-shaped and
    invalid Flax path at once.

    !!! Example

        ```python
        flax_vae, params = diffusers.FlaxAutoencoderKL.from_pretrained(folder)
        vae = eqx_vae.from_flax_params(params, dict(flax_vae.config))
        ```
    """
    if not isinstance(config, AutoencoderKLConfig):
        config = AutoencoderKLConfig.from_dict(config)
    _refuse_flux2(config)
    leaves, problems = flax_leaves(params)
    return load_flax_leaves(leaves, problems, config, dtype=dtype, check_finite=check_finite)


def to_flax_params(model: AutoencoderKL) -> dict[str, Any]:
    """The model's parameters as diffusers' `FlaxAutoencoderKL` keeps them; the inverse
    of [`eqx_vae.from_flax_params`][].

    **Arguments:**

    - `model`: an [`eqx_vae.AutoencoderKL`][].

    **Returns:**

    Nested plain dicts of NumPy arrays in the model's dtype, with the tree structure of
    `FlaxAutoencoderKL.init_weights`: what `FlaxAutoencoderKL.apply({"params": params},
    ...)` takes. A model without quant convs or mid-block attention gives a tree without
    them, which maxdiffusion (for the quant convs) but not diffusers' `FlaxAutoencoderKL`
    can express.
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"`model` must be an AutoencoderKL, got {type(model).__name__}.")
    _refuse_flux2(model.config)
    params: dict[str, Any] = {}
    for parameter, (_, leaf) in zip(
        flax_layout(model.config), named_parameters(model), strict=True
    ):
        array = np.asarray(leaf).reshape(parameter.torch_shape)
        if parameter.axes is not None:
            array = array.transpose(np.argsort(parameter.axes))
        node = params
        *modules, name = parameter.path.split("/")
        for module in modules:
            node = node.setdefault(module, {})
        node[name] = np.array(array, order="C")
    return params


def _refuse_flux2(config: AutoencoderKLConfig) -> None:
    if config.patch_size is not None:
        raise ValueError(
            "FLUX.2's autoencoder has no Flax layout (diffusers' FlaxAutoencoderKL has no "
            "latent BatchNorm); use `load_diffusers`/`save_diffusers` or `eqx_vae.save`."
        )
