"""Gradient checkpointing of one block: its activations recomputed in the backward pass
instead of stored."""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
from jaxtyping import Array


Block = TypeVar("Block")
Scope = TypeVar("Scope")
Out = TypeVar("Out")


def checkpoint(
    fn: Callable[[Block, Array, Scope], Out],
) -> Callable[[Block, Array, Scope], Out]:
    """`fn(block, x, scope)`, differentiated by recomputing it from its arguments in the
    backward pass rather than keeping its intermediate values. Every array of the
    arguments (the block's parameters, the input, any statistics in `scope`) is an
    input of the recomputation, so that re-tracing it sees the same values.

    Off the CPU this is `eqx.filter_checkpoint`. XLA's CPU compiler removes the
    optimisation barriers that `jax.checkpoint` places around the recomputation before
    it eliminates common subexpressions, so the recomputation is merged back into the
    forward pass and every activation is kept (no memory saved). Here the backward pass
    instead recomputes inside a conditional whose two branches are the same
    computation; the compiler does not merge across the branch boundary. The gradients
    are those of `fn`.
    """
    if jax.default_backend() != "cpu":
        return eqx.filter_checkpoint(fn)

    def wrapped(block: Block, x: Array, scope: Scope) -> Out:
        params, static = eqx.partition((block, scope), eqx.is_array)

        def call(params: Any, x: Array) -> Out:
            block, scope = eqx.combine(params, static)
            return fn(block, x, scope)

        @jax.custom_vjp
        def remat(params: Any, x: Array) -> Out:
            return call(params, x)

        def forward(params: Any, x: Array) -> tuple[Out, tuple[Any, Array]]:
            return call(params, x), (params, x)

        backward = _recomputing_backward(call)

        remat.defvjp(forward, backward)
        return remat(params, x)

    return wrapped


def _recomputing_backward(call: Callable[[Any, Array], Any]) -> Callable:
    """The backward pass of `call(params, x)` that recomputes its forward pass inside a
    conditional (see `checkpoint`)."""

    def backward(residuals: tuple[Any, Array], cotangent: Any) -> tuple[Any, Array]:
        # The forward pass is recomputed inside the conditional, and what the gradient
        # needs of it comes out as the pullback's arrays; the gradient's own convolutions
        # run outside, where the compiler gives them its fast kernels (inside a branch
        # they fall back to a generic, much slower one).
        structure = []

        def recompute(residuals: tuple[Any, Array], cotangent: Any) -> tuple[list, Any]:
            pullback = jax.vjp(call, *residuals)[1]
            leaves, treedef = jax.tree_util.tree_flatten(pullback)
            structure.append(treedef)
            # Ties the branch to the cotangent (zero unless a parameter is NaN), so that
            # it runs in the backward pass rather than early.
            first = jax.tree_util.tree_leaves(residuals)[0].ravel()[0]
            tie = first - first
            tied = jax.tree_util.tree_map(lambda c: c + tie.astype(c.dtype), cotangent)
            return leaves, tied

        # A predicate the compiler cannot evaluate (false only for a NaN parameter, where
        # either branch gives the same result). Taken from the parameters, which are not
        # batched under `vmap`, so that it stays a conditional.
        leaf = jax.tree_util.tree_leaves(residuals)[0].ravel()[0]
        leaves, cotangent = jax.lax.cond(leaf == leaf, recompute, recompute, residuals, cotangent)
        pullback = jax.tree_util.tree_unflatten(structure[-1], leaves)
        return pullback(cotangent)

    return backward
