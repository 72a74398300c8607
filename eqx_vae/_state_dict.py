import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._autoencoder import AutoencoderKL
from ._config import AutoencoderKLConfig
from ._custom_types import DTypeLike
from ._errors import CheckpointError
from ._host_arrays import aligned_empty


# Attention parameter names written by diffusers before 0.14.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# How many problems of each kind an error message lists before summarising the rest.
_MAX_LISTED = 50

# Parameters a checkpoint may leave out, and the value they then take. PyTorch fills in
# a BatchNorm's `num_batches_tracked` the same way (FLUX.2's original file may lack it).
_OPTIONAL = {"bn.num_batches_tracked": 0}


def leaf_key(path: tuple[Any, ...]) -> str:
    """The dotted diffusers-style name of a pytree path, e.g.
    `encoder.down_blocks.0.resnets.1.conv1.weight`."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        else:
            raise TypeError(f"Unexpected pytree path entry {entry!r}.")
    return ".".join(parts)


def named_parameters(model: Any) -> list[tuple[str, Any]]:
    """The `(name, array)` pairs of a model (or of an `eqx.filter_eval_shape`
    skeleton, whose leaves are `jax.ShapeDtypeStruct`s), in pytree order."""
    leaves = jax.tree_util.tree_flatten_with_path(model)[0]
    return [(leaf_key(path), leaf) for path, leaf in leaves if _is_array(leaf)]


def torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape PyTorch stores a parameter in: Equinox keeps convolution biases as
    `(O, 1, 1)`, PyTorch as `(O,)`; everything else is the same."""
    if name.endswith(".bias") and len(shape) == 3 and shape[1:] == (1, 1):
        return shape[:1]
    return shape


@functools.lru_cache(maxsize=16)
def abstract_model(config: AutoencoderKLConfig, dtype: DTypeLike | None = None) -> AutoencoderKL:
    """An `AutoencoderKL` whose leaves are `jax.ShapeDtypeStruct`s: the structure
    without any arrays or random initialisation. Cached: it is immutable, and tracing
    the constructor takes a few tenths of a second for an SD-size model."""
    return eqx.filter_eval_shape(AutoencoderKL, config, dtype, key=jax.random.key(0))


def from_diffusers_state_dict(
    state_dict: Mapping[str, Any],
    config: AutoencoderKLConfig | Mapping[str, Any],
    *,
    dtype: DTypeLike | None = None,
    check_finite: bool = False,
) -> AutoencoderKL:
    """Builds a model from a diffusers `AutoencoderKL` state dict.

    The model structure comes from an `eqx.filter_eval_shape` skeleton, so no random
    initialisation is computed. Both attention naming schemes are accepted
    (`to_q`/`to_k`/`to_v`/`to_out.0`, and the older `query`/`key`/`value`/`proj_attn`).
    Names and shapes are all checked before any data is converted. FLUX.2's
    `bn.num_batches_tracked` may be left out (it is then 0, as in PyTorch).

    **Arguments:**

    - `state_dict`: a mapping from diffusers parameter names to arrays (NumPy arrays,
        JAX arrays, CPU torch tensors, or lazily read tensors with `shape`, `dtype` and
        `read()`, as the file loaders use).
    - `config`: the model's [`eqx_vae.AutoencoderKLConfig`][], or the contents of its
        `config.json`.
    - `dtype`: dtype of the model's floating-point arrays (the parameters, and FLUX.2's
        BatchNorm statistics); float32 by default. The integer `bn.num_batches_tracked`
        stays an int32.
    - `check_finite`: also refuse parameters that contain NaN or infinity.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][].

    **Raises:**

    [`eqx_vae.CheckpointError`][] listing every missing, unexpected, mis-shaped and
    invalid parameter at once.
    """
    if not isinstance(config, AutoencoderKLConfig):
        config = AutoencoderKLConfig.from_dict(config)
    headline = "Cannot load the state dict into AutoencoderKL"
    skeleton = abstract_model(config)
    tensors, problems = _rename_old_attention(state_dict)
    expected = named_parameters(skeleton)

    missing: list[str] = []
    misshaped: list[str] = []
    for name, leaf in expected:
        if name not in tensors:
            if name in _OPTIONAL:
                tensors[name] = np.full(leaf.shape, _OPTIONAL[name], leaf.dtype)
                continue
            missing.append(f"{name}: expected shape {torch_shape(name, leaf.shape)}")
            continue
        shape = shape_of(tensors[name])
        found = dtype_name(tensors[name])
        if shape not in (leaf.shape, torch_shape(name, leaf.shape)):
            misshaped.append(
                f"{name}: checkpoint has shape {shape}, model expects "
                f"{torch_shape(name, leaf.shape)}"
            )
        elif _is_integer(leaf.dtype) and found not in _INTEGER:
            problems.append(f"{name}: dtype {found} is not an integer dtype")
        elif not _is_integer(leaf.dtype) and found not in FLOATING:
            problems.append(f"{name}: dtype {found} is not floating point")
    known = {name for name, _ in expected}
    unexpected = [
        f"{name}: shape {shape_of(value)}" for name, value in tensors.items() if name not in known
    ]
    raise_if_problems(
        headline,
        config,
        missing=missing,
        unexpected=unexpected,
        misshaped=misshaped,
        invalid=problems,
    )

    return fill_skeleton(
        tensors, config, dtype=dtype, check_finite=check_finite, headline=headline
    )


def fill_skeleton(
    tensors: Mapping[str, Any],
    config: AutoencoderKLConfig,
    *,
    dtype: DTypeLike | None,
    check_finite: bool,
    headline: str,
    labels: Mapping[str, str] | None = None,
) -> AutoencoderKL:
    """The model whose parameters are `tensors`, by diffusers name, whose names and
    shapes the caller has checked; each floating-point one is converted to `dtype`
    (float32 by default) on its own (integer ones keep the model's dtype), so at most
    one parameter exists twice at a time. `labels` gives the name a non-finite
    parameter is reported under, where the caller's names are not diffusers'."""
    skeleton = abstract_model(config)
    float_dtype = np.dtype(jnp.dtype(jnp.float32 if dtype is None else dtype))
    leaves = []
    non_finite = []
    for name, leaf in named_parameters(skeleton):
        array, owned = _materialise(tensors[name])
        array = array.reshape(leaf.shape)
        out_dtype = np.dtype(leaf.dtype) if _is_integer(leaf.dtype) else float_dtype
        if _is_integer(out_dtype) and np.any(array != array.astype(out_dtype)):
            non_finite.append(f"{name}: values {array} do not fit in {out_dtype}")
            continue
        if array.dtype != out_dtype:
            converted = aligned_empty(array.shape, out_dtype)
            np.copyto(converted, array, casting="unsafe")
            array, owned = converted, True
        if check_finite and not np.all(np.isfinite(array)):
            count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            label = name if labels is None else labels[name]
            non_finite.append(f"{label}: {count} of {array.size} values are NaN or infinite")
        # An array nothing else references can become the JAX array without a copy.
        leaves.append(jax.device_put(array) if owned else jnp.array(array))
        del array
    raise_if_problems(headline, config, invalid=non_finite)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(skeleton), leaves)


def to_diffusers_state_dict(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The model's parameters (and FLUX.2's BatchNorm statistics) under diffusers' names
    and in PyTorch's shapes, as NumPy arrays; the inverse of
    [`eqx_vae.from_diffusers_state_dict`][]. Integers are int64, as PyTorch keeps
    `num_batches_tracked`."""
    out = {}
    for name, leaf in named_parameters(model):
        array = np.asarray(leaf).reshape(torch_shape(name, leaf.shape))
        out[name] = array.astype(np.int64) if _is_integer(array.dtype) else array
    return out


def cast_floating(tree: Any, dtype: DTypeLike) -> Any:
    """`tree` with its floating-point arrays in `dtype`; integer arrays (a BatchNorm's
    `num_batches_tracked`) and everything else unchanged."""

    def cast(leaf: Any) -> Any:
        if _is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def _rename_old_attention(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    tensors: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in state_dict.items():
        match = _OLD_ATTENTION.match(name)
        new = name
        if match is not None:
            prefix, old, suffix = match.groups()
            new = f"{prefix}{_OLD_ATTENTION_NAMES[old]}.{suffix}"
        if new in tensors:
            problems.append(f"{new}: given twice (as {new!r} and under its old name)")
            continue
        tensors[new] = value
    return tensors, problems


def raise_if_problems(
    headline: str,
    config: AutoencoderKLConfig,
    *,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    misshaped: Sequence[str] = (),
    invalid: Sequence[str] = (),
) -> None:
    sections = []
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("invalid", invalid),
    ):
        if items:
            listed = "\n".join(f"    {item}" for item in sorted(items)[:_MAX_LISTED])
            more = len(items) - _MAX_LISTED
            tail = f"\n    ... and {more} more" if more > 0 else ""
            sections.append(f"  {len(items)} {title}:\n{listed}{tail}")
    if sections:
        fields = [
            f"latent_channels={config.latent_channels}",
            f"block_out_channels={config.block_out_channels}",
            f"layers_per_block={config.layers_per_block}",
        ]
        if config.decoder_block_out_channels is not None:
            fields.append(f"decoder_block_out_channels={config.decoder_block_out_channels}")
        if config.patch_size is not None:
            fields.append(f"patch_size={config.patch_size}")
        fields += [
            f"use_quant_conv={config.use_quant_conv}",
            f"use_post_quant_conv={config.use_post_quant_conv}",
            f"mid_block_add_attention={config.mid_block_add_attention}",
        ]
        raise CheckpointError(f"{headline} ({', '.join(fields)}):\n" + "\n".join(sections))


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray))


FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})
_INTEGER = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


def _is_integer(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.integer)


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def dtype_name(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return np.asarray(value).dtype.name
    if str(dtype).startswith("torch."):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def _materialise(value: Any) -> tuple[np.ndarray, bool]:
    """The value as a NumPy array, and whether that array is a fresh buffer nothing
    else references (so that it may back a JAX array without a copy)."""
    if callable(getattr(value, "read", None)):
        return value.read(), True
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        # A torch tensor: NumPy has no bfloat16, so widen it first.
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy(), True
        return value.numpy(), False
    return np.asarray(value), False
