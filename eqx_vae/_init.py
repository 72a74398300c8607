"""Layers initialised as PyTorch initialises them, reproducibly: the same key gives
bit-identical parameters eagerly, under `jax.jit` and under `eqx.filter_eval_shape`.

Each weight and bias is drawn from its own key (the layer's key split in two, as
`eqx.nn.Conv2d` does): a seed of two words from `jax.random.bits`, then Threefry-2x32
of the counters `0, 1, ...` under that seed, two values per counter. Eagerly, the
counters run through one compiled program in fixed-size chunks, so that building a
model compiles one small program instead of one random-number program per parameter
shape (an SD-size model has 20 shapes; measured: 2.0 s instead of 16 s to build one on
a 2-core EPYC); traced, they are one array. Both compute the same integers and the
same exactly rounded floats."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.extend.random import threefry2x32_p
from jaxtyping import Array, Float, UInt32

from ._custom_types import DTypeLike, KeyArray
from ._host_arrays import aligned_empty


# Values per eager call (even): large enough for few calls, small enough that a bias (a
# few hundred values) wastes little.
_CHUNK = 1 << 16


def _uniform_bits(
    seed: UInt32[Array, "2"], offset: UInt32[Array, ""], bound: Float[Array, ""], size: int
) -> Float[Array, " {size}"]:
    """Values `offset, ..., offset + size - 1` (`offset` even) of the stream of `seed`,
    uniform in `[-bound, bound)`. Counter `i` gives values `2i` and `2i + 1` (the two
    words of Threefry-2x32); 24 random bits `u` become `(u * 2**-23 - 1) * bound`, where
    only the last multiplication rounds."""
    # In `lax` primitives, not `jax.numpy`: traced (as when a skeleton is built under
    # `eqx.filter_eval_shape` to load weights into), each `jax.numpy` function traces a
    # program of its own for every new size, which made building a skeleton 3x slower.
    lax = jax.lax
    pairs = -(-size // 2)
    counters = lax.div(offset, np.uint32(2)) + lax.iota(np.uint32, pairs)
    zeros = lax.full((pairs,), 0, np.uint32)
    high, low = threefry2x32_p.bind(seed[0], seed[1], zeros, counters)
    pair = [lax.broadcast_in_dim(w, (pairs, 1), (0,)) for w in (high, low)]
    words = lax.slice(lax.reshape(lax.concatenate(pair, 1), (2 * pairs,)), (0,), (size,))
    bits = lax.shift_right_logical(words, np.uint32(8))
    unit = lax.convert_element_type(bits, np.float32) * np.float32(2.0**-23) - np.float32(1.0)
    return unit * bound


_uniform_chunk = jax.jit(functools.partial(_uniform_bits, size=_CHUNK))
# Traced, as its own `jit` so that each size is traced once however many layers have it
# (a skeleton of an SD-size model: 144 draws of 20 sizes).
_uniform_traced = jax.jit(_uniform_bits, static_argnames="size")


def uniform(key: KeyArray, shape: tuple[int, ...], bound: float, dtype: DTypeLike | None) -> Array:
    """An array of `shape` uniform in `[-bound, bound)` drawn from `key`, computed in
    float32 and cast to `dtype` (float32 by default)."""
    size = math.prod(shape)
    seed = jax.random.bits(key, (2,), jnp.uint32)
    bound32 = jnp.float32(bound)
    if isinstance(seed, Tracer):
        values = _uniform_traced(seed, jnp.uint32(0), bound32, size=size).reshape(shape)
        return values if dtype is None else values.astype(dtype)
    # Eagerly: the chunks straight into one host buffer, which becomes the array
    # without a copy (and without compiling anything shape-specific).
    chunks = [
        _uniform_chunk(seed, np.uint32(offset), bound32) for offset in range(0, size, _CHUNK)
    ]
    host = aligned_empty(shape, np.float32).reshape(-1)
    for i, chunk in enumerate(chunks):
        part = host[i * _CHUNK : (i + 1) * _CHUNK]
        part[...] = np.asarray(chunk)[: part.size]
    values = jax.device_put(host.reshape(shape))
    return values if dtype is None else values.astype(dtype)


def split_keys(key: KeyArray, count: int) -> list[KeyArray]:
    """`jax.random.split(key, count)` as a list, so that it can be unpacked. Eagerly the
    keys come out through the host in one step (indexing a key array compiles a program
    for every index, which made building a model several times slower)."""
    keys = jax.random.split(key, count)
    if isinstance(keys, Tracer):
        return [keys[i] for i in range(count)]
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(keys)
        return [
            jax.random.wrap_key_data(d, impl=impl) for d in np.asarray(jax.random.key_data(keys))
        ]
    return [jnp.asarray(row) for row in np.asarray(keys)]  # raw uint32 keys


@functools.cache
def _conv_skeleton(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int | tuple[tuple[int, int], tuple[int, int]],
    dtype: np.dtype | None,
) -> eqx.nn.Conv2d:
    return eqx.filter_eval_shape(
        eqx.nn.Conv2d,
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dtype=dtype,
        key=jax.random.key(0),
    )


@functools.cache
def _linear_skeleton(in_features: int, out_features: int, dtype: np.dtype | None) -> eqx.nn.Linear:
    return eqx.filter_eval_shape(
        eqx.nn.Linear, in_features, out_features, dtype=dtype, key=jax.random.key(0)
    )


def _fill(layer, key: KeyArray, fan_in: int, dtype: np.dtype | None):
    """`layer` (a skeleton) with weight and bias uniform in `+-1/sqrt(fan_in)`: PyTorch's
    default for convolutions and linear layers."""
    weight_key, bias_key = split_keys(key, 2)
    bound = 1.0 / math.sqrt(fan_in)
    weight = uniform(weight_key, layer.weight.shape, bound, dtype)
    bias = uniform(bias_key, layer.bias.shape, bound, dtype)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
    dtype: DTypeLike | None,
    key: KeyArray,
) -> eqx.nn.Conv2d:
    """An `eqx.nn.Conv2d` with bias, initialised from `key` (see the module's
    docstring)."""
    dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    skeleton = _conv_skeleton(in_channels, out_channels, kernel_size, stride, padding, dtype)
    return _fill(skeleton, key, in_channels * kernel_size**2, dtype)


def linear(
    in_features: int, out_features: int, *, dtype: DTypeLike | None, key: KeyArray
) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` with bias, initialised from `key`."""
    dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    return _fill(_linear_skeleton(in_features, out_features, dtype), key, in_features, dtype)
