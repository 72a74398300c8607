from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import KeyArray
from ._host_arrays import aligned_empty


_Tree = TypeVar("_Tree")
_LAYERS = (eqx.nn.Conv2d, eqx.nn.Linear, eqx.nn.GroupNorm)


def _is_layer(x: Any) -> bool:
    return isinstance(x, _LAYERS)


def default_init(skeleton: _Tree, key: KeyArray) -> _Tree:
    """Initialises every layer of `skeleton` (a pytree whose leaves may be
    `jax.ShapeDtypeStruct`s) as PyTorch does by default: convolution and linear weights
    and biases uniform in `(-1/sqrt(fan_in), 1/sqrt(fan_in))`, GroupNorm scales one and
    offsets zero.

    With a concrete key the numbers come from NumPy's PCG64 generator seeded by the
    key, layer after layer, straight into the arrays the model keeps: this builds an
    SD-size model in well under a second, where one small XLA computation per layer
    would take several. Under a JAX transformation (`jit`, `eqx.filter_eval_shape`)
    `jax.random` is used instead, so building abstractly costs nothing.
    """
    layers, treedef = jax.tree_util.tree_flatten(skeleton, is_leaf=_is_layer)
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        concrete = True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        seed, concrete = None, False
    if seed is not None:
        draw = _numpy_uniform(np.random.default_rng(seed))
    else:
        keys = iter(jax.random.split(key, 2 * len(layers)))
        draw = _jax_uniform(keys)
    out = []
    for layer in layers:
        if isinstance(layer, eqx.nn.GroupNorm):
            out.append(_fill_norm(layer, concrete))
        elif isinstance(layer, (eqx.nn.Conv2d, eqx.nn.Linear)):
            weight = layer.weight
            bound = 1.0 / np.sqrt(np.prod(weight.shape[1:]))
            new_weight = draw(weight.shape, weight.dtype, bound)
            if layer.bias is None:
                out.append(eqx.tree_at(lambda m: m.weight, layer, new_weight))
            else:
                new_bias = draw(layer.bias.shape, layer.bias.dtype, bound)
                out.append(
                    eqx.tree_at(lambda m: (m.weight, m.bias), layer, (new_weight, new_bias))
                )
        else:
            out.append(layer)
    return jax.tree_util.tree_unflatten(treedef, out)


def _numpy_uniform(rng: np.random.Generator):
    def draw(shape: tuple[int, ...], dtype: Any, bound: float) -> jax.Array:
        values = aligned_empty(shape, np.float32)
        rng.random(out=values.reshape(-1), dtype=np.float32)
        values *= np.float32(2 * bound)
        values -= np.float32(bound)
        if np.dtype(dtype) != np.float32:
            return jnp.asarray(values, dtype)
        # A fresh aligned buffer becomes the JAX array without a copy.
        return jax.device_put(values)

    return draw


def _jax_uniform(keys):
    def draw(shape: tuple[int, ...], dtype: Any, bound: float) -> jax.Array:
        return jax.random.uniform(next(keys), shape, dtype, minval=-bound, maxval=bound)

    return draw


def _fill_norm(norm: eqx.nn.GroupNorm, concrete: bool) -> eqx.nn.GroupNorm:
    def full(leaf: Any, value: float) -> jax.Array:
        if concrete:
            return jax.device_put(np.full(leaf.shape, value, np.dtype(leaf.dtype)))
        return jnp.full(leaf.shape, value, leaf.dtype)

    if norm.weight is None or norm.bias is None:
        return norm
    return eqx.tree_at(
        lambda n: (n.weight, n.bias), norm, (full(norm.weight, 1.0), full(norm.bias, 0.0))
    )
