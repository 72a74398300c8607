"""One resolution stage computed tile by tile, with the whole image's GroupNorm
statistics (see `eqx_vae._tiling`)."""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._custom_types import Observed
from ._scope import Scope


Stage = Callable[[Array, Scope], tuple[Array, Observed]]
Stats = dict[str, tuple[Array, Array]]


class _Axis(NamedTuple):
    """How an axis is cut, all on even pixels (so that halving or doubling the
    resolution keeps tiles aligned)."""

    window: int  # the size of every tile's window: its part plus margins
    block: int  # the size of every tile's output block (the last may overlap)
    starts: list[int]  # where each window starts
    cuts: list[int]  # the boundaries of the parts the tiles own: a partition
    writes: list[int]  # where each tile's output block starts


def _axis_tiles(n: int, tile: int, margin: int) -> _Axis:
    tile = max(2, tile // 2 * 2)
    margin += margin % 2
    if tile + 2 * margin >= n:
        return _Axis(window=n, block=n, starts=[0], cuts=[0, n], writes=[0])
    count = math.ceil(n / tile)
    cuts = [min(n, i * tile) for i in range(count + 1)]
    window = tile + 2 * margin
    writes = [min(cuts[i], n - tile) for i in range(count)]
    starts = [min(max(0, w - margin), n - window) for w in writes]
    return _Axis(window=window, block=tile, starts=starts, cuts=cuts, writes=writes)


def _pool(count: Array, mean: Array, squares: Array) -> tuple[Array, Array]:
    """Whole-image mean and variance from per-tile counts, means and sums of squared
    deviations (stacked over the tiles), by Chan et al.'s parallel formula."""
    total = jnp.sum(count)
    overall = jnp.sum(count[:, None] * mean, axis=0) / total
    spread = jnp.sum(squares + count[:, None] * jnp.square(mean - overall[None, :]), axis=0)
    return overall, spread / total


def _tile_table(rows: _Axis, cols: _Axis, scale: float) -> dict[str, Array]:
    """Per tile: where its window starts, where its output block lies within its output
    and within the stage's output, and the part it owns as fractions of its window."""

    def per_tile(axis: _Axis, index: int) -> tuple[int, int, float, float]:
        start, write = axis.starts[index], axis.writes[index]
        cut0, cut1 = axis.cuts[index], axis.cuts[index + 1]
        return start, write, (cut0 - start) / axis.window, (cut1 - start) / axis.window

    info = [
        (per_tile(rows, i), per_tile(cols, j))
        for i in range(len(rows.starts))
        for j in range(len(cols.starts))
    ]
    return {
        "start": jnp.asarray([[r[0], c[0]] for r, c in info], jnp.int32),
        "offset": jnp.asarray(
            [[round((r[1] - r[0]) * scale), round((c[1] - c[0]) * scale)] for r, c in info],
            jnp.int32,
        ),
        "target": jnp.asarray(
            [[round(r[1] * scale), round(c[1] * scale)] for r, c in info], jnp.int32
        ),
        "owned": jnp.asarray([[[r[2], r[3]], [c[2], c[3]]] for r, c in info], jnp.float32),
    }


def run_stage(
    stage: Stage,
    x: Float[Array, "h w c"],
    scope: Scope,
    *,
    scale: float,
    tile: int,
    margin: int,
    exact: bool,
) -> Float[Array, "h2 w2 c2"]:
    """`stage(x)` computed tile by tile: each tile reads its window of `x` (its part plus
    `margin` on each side, at least the stage's receptive field) and writes the part it
    owns. With `exact`, every GroupNorm of the stage is normalised with the statistics
    of the whole image: measured one GroupNorm after another (each pass runs the tiles
    with the statistics already known and pools the moments of the parts they own),
    then passed to the last pass as `Policy.norm_stats`. Otherwise each tile uses its
    own statistics."""
    rows = _axis_tiles(x.shape[0], tile, margin)
    cols = _axis_tiles(x.shape[1], tile, margin)
    if len(rows.starts) * len(cols.starts) == 1:
        return stage(x, scope)[0]
    tiles = _tile_table(rows, cols, scale)
    window = (rows.window, cols.window)

    def window_of(t: dict[str, Array]) -> Array:
        origin = (t["start"][0], t["start"][1], jnp.int32(0))
        return jax.lax.dynamic_slice(x, origin, (*window, x.shape[2]))

    stats = _measure(stage, window_of, tiles, scope) if exact else {}
    known = {**(scope.policy.norm_stats or {}), **stats}
    final = Scope(scope.policy.replace(norm_stats=known or None), place=scope.place)
    first = jax.tree_util.tree_map(lambda a: a[0], tiles)
    probe = jax.eval_shape(lambda t: stage(window_of(t), final)[0], first)
    block = (round(rows.block * scale), round(cols.block * scale))

    def step(result: Array, t: dict[str, Array]) -> tuple[Array, None]:
        y, _ = stage(window_of(t), final)
        offset, target = t["offset"], t["target"]
        part = jax.lax.dynamic_slice(y, (offset[0], offset[1], jnp.int32(0)), (*block, y.shape[2]))
        return jax.lax.dynamic_update_slice(
            result, part, (target[0], target[1], jnp.int32(0))
        ), None

    out_h, out_w = round(x.shape[0] * scale), round(x.shape[1] * scale)
    result = jnp.zeros((out_h, out_w, probe.shape[2]), probe.dtype)
    return jax.lax.scan(step, result, tiles)[0]


def _measure(
    stage: Stage,
    window_of: Callable[[dict[str, Array]], Array],
    tiles: dict[str, Array],
    scope: Scope,
) -> Stats:
    """The whole image's statistics of every GroupNorm of the stage, in forward order:
    each pass observes one GroupNorm's input over the tiles' owned parts (the compiler
    drops what follows it)."""
    given = scope.policy.norm_stats or {}

    def observe(t: dict[str, Array], known: Stats) -> Observed:
        policy = scope.policy.replace(norm_stats={**given, **known} or None)
        return stage(window_of(t), Scope(policy, t["owned"], scope.place))[1]

    # The GroupNorms in forward order: the order they report in (a pytree of the
    # observations would list them sorted by name).
    order: list[str] = []

    def discover(t: dict[str, Array]) -> Observed:
        observed = observe(t, {})
        order.extend(observed)
        return observed

    jax.eval_shape(discover, jax.tree_util.tree_map(lambda a: a[0], tiles))
    places = [p for p in order if p not in given]
    stats: Stats = {}
    for place in places:
        known = dict(stats)
        moments = jax.lax.map(lambda t, p=place, k=known: observe(t, k)[p], tiles)
        stats[place] = _pool(*moments)
    return stats
