"""Gradient checkpointing of one block: its activations recomputed in the backward pass
instead of stored."""

from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
from jaxtyping import Array


Block = TypeVar("Block")


def checkpoint(fn: Callable[[Block, Array], Array]) -> Callable[[Block, Array], Array]:
    """`fn(block, x)`, differentiated by recomputing it from `block` and `x` in the
    backward pass rather than keeping its intermediate values.

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

    def wrapped(block: Block, x: Array) -> Array:
        params, static = eqx.partition(block, eqx.is_array)

        def call(params: Block, x: Array) -> Array:
            return fn(eqx.combine(params, static), x)

        @jax.custom_vjp
        def remat(params: Block, x: Array) -> Array:
            return call(params, x)

        def forward(params: Block, x: Array) -> tuple[Array, tuple[Block, Array]]:
            return call(params, x), (params, x)

        def backward(residuals: tuple[Block, Array], cotangent: Array) -> tuple[Block, Array]:
            # The forward pass is recomputed inside the conditional, and what the
            # gradient needs of it comes out as the pullback's arrays; the gradient's own
            # convolutions run outside, where the compiler gives them its fast kernels
            # (inside a branch they fall back to a generic, much slower one).
            structure = []

            def recompute(
                residuals: tuple[Block, Array], cotangent: Array
            ) -> tuple[list[Array], Array]:
                pullback = jax.vjp(call, *residuals)[1]
                leaves, treedef = jax.tree_util.tree_flatten(pullback)
                structure.append(treedef)
                # Ties the branch to the cotangent (zero unless a parameter is NaN), so
                # that it runs in the backward pass rather than early.
                first = jax.tree_util.tree_leaves(residuals)[0].ravel()[0]
                return leaves, cotangent + (first - first).astype(cotangent.dtype)

            # A predicate the compiler cannot evaluate (false only for a NaN parameter,
            # where either branch gives the same result). Taken from the parameters,
            # which are not batched under `vmap`, so that it stays a conditional.
            leaf = jax.tree_util.tree_leaves(residuals)[0].ravel()[0]
            leaves, cotangent = jax.lax.cond(
                leaf == leaf, recompute, recompute, residuals, cotangent
            )
            pullback = jax.tree_util.tree_unflatten(structure[-1], leaves)
            return pullback(cotangent)

        remat.defvjp(forward, backward)
        return remat(params, x)

    return wrapped
