"""Encoding and decoding images larger than memory allows in one piece, with the same
result as in one piece.

The network is cut where the resolution changes. The latent-resolution part (with
the attention over all pixels) runs whole: it is small. Each resolution stage in
between runs tile by tile over the stage's input, which is kept whole: every tile reads
its part of the input plus a margin wider than the stage's receptive field, and
contributes only the part it owns to the stage's output, so the convolutions see
exactly what they would see untiled. GroupNorm needs the statistics of the whole
image, which depend on every earlier layer; within a stage they are found layer by
layer, each time running the tiles up to that GroupNorm with the statistics already
known and pooling the moments of the parts the tiles own. A stage with `G` GroupNorms
costs about `G / 2 + 1` runs of it, but memory stays that of one tile plus the stage's
input and output.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._autoencoder import AutoencoderKL, _check_input
from ._context import Context
from ._conv import conv_hwc, to_chw, to_hwc
from ._custom_types import DTypeLike
from ._distribution import DiagonalGaussian
from ._norm import group_moments


def tiled_decode(
    model: AutoencoderKL,
    z: Float[Array, "c h w"],
    *,
    tile_size: int = 512,
    exact_statistics: bool = True,
    dtype: DTypeLike | None = None,
) -> Float[Array, "o H W"]:
    """Decodes a latent tile by tile, in memory bounded by the tile size, with the same
    result as `model.decode(z)` (up to floating-point reordering).

    **Arguments:**

    - `model`: the autoencoder.
    - `z`: an unbatched latent `(latent_channels, height, width)` of any size.
    - `tile_size`: the largest tile, in pixels of each stage's output (the image for the
        last stage). Smaller tiles use less memory and repeat more work in the margins.
    - `exact_statistics`: normalise every tile with GroupNorm statistics of the whole
        image (found layer by layer; a stage costs a few runs of itself), rather than
        of the tile (one run; tiles then differ in tone, as diffusers' tiles do).
    - `dtype`: the compute dtype, as in [`eqx_vae.AutoencoderKL.decode`][].

    **Returns:**

    The image `(out_channels, height * f, width * f)`.

    !!! Example

        ```python
        decode = eqx.filter_jit(eqx_vae.tiled_decode, compiler_options=eqx_vae.compiler_options())
        image = decode(model, z)  # z: (4, 256, 256) -> a 2048x2048 image
        ```
    """
    _check_input(z, "tiled_decode", "latent", model.latent_channels, 1)
    _check_tile(tile_size, 2)
    ctx = model.context(dtype)
    decoder = model.decoder
    x = to_hwc(z).astype(ctx.stream_dtype(z.dtype))
    if model.post_quant_conv is not None:
        x = conv_hwc(model.post_quant_conv, x, ctx)
    x = decoder.latent_stage_hwc(x, ctx)
    # The receptive field of a stage: the upsampler's and every ResNet convolution's
    # 3x3 window, plus the output convolution, in output pixels.
    radius = 1 + 2 * len(decoder.up_blocks[-1].resnets) + 1
    for stage in range(decoder.num_upsampling_stages):
        x = _run_stage(
            lambda x, c, stage=stage: decoder.upsampling_stage_hwc(stage, x, c),
            x,
            ctx,
            scale=2,
            tile=tile_size // 2,
            margin=math.ceil(radius / 2) + 1,
            exact=exact_statistics,
        )
    return to_chw(x)


def tiled_encode(
    model: AutoencoderKL,
    x: Float[Array, "c H W"],
    *,
    tile_size: int = 512,
    exact_statistics: bool = True,
    dtype: DTypeLike | None = None,
) -> DiagonalGaussian:
    """Encodes an image tile by tile, in memory bounded by the tile size, with the same
    result as `model.encode(x)`; the counterpart of [`eqx_vae.tiled_decode`][].

    **Arguments:**

    - `x`: an unbatched image `(in_channels, height, width)`, height and width
        multiples of `spatial_factor`.
    - `tile_size`: the largest tile, in pixels of each stage's input (the image for
        the first stage).
    - `exact_statistics`, `dtype`: as in `tiled_decode`.

    **Returns:**

    The posterior over the whole latent.
    """
    _check_input(x, "tiled_encode", "image", model.in_channels, model.spatial_factor)
    _check_tile(tile_size, 2)
    ctx = model.context(dtype)
    encoder = model.encoder
    h = to_hwc(x).astype(ctx.stream_dtype(x.dtype))
    # `conv_in`, the ResNet convolutions and the downsampler, in input pixels.
    radius = 1 + 2 * len(encoder.down_blocks[0].resnets) + 1
    for stage in range(encoder.num_downsampling_stages):
        h = _run_stage(
            lambda h, c, stage=stage: encoder.downsampling_stage_hwc(stage, h, c),
            h,
            ctx,
            scale=0.5,
            tile=tile_size,
            margin=radius + 1 + (radius + 1) % 2,
            exact=exact_statistics,
        )
    moments = encoder.latent_stage_hwc(h, ctx)
    if model.quant_conv is not None:
        moments = conv_hwc(model.quant_conv, moments, ctx)
    return DiagonalGaussian.from_moments(to_chw(moments))


def _check_tile(tile_size: int, multiple: int) -> None:
    if tile_size < 4 * multiple or tile_size % multiple:
        raise ValueError(
            f"`tile_size={tile_size}` must be a multiple of {multiple} and at least "
            f"{4 * multiple}."
        )


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


class _Stop(Exception):
    """Ends the tracing of a tile once the GroupNorm being measured is reached."""

    def __init__(self, moments: tuple[Array, Array, Array]):
        super().__init__()
        self.moments = moments


class _Statistics:
    """The GroupNorm statistics of a tile's pass: the known whole-image statistics for
    the first layers; then, if `measure` is set, the moments of the next layer's input
    over the tile's owned part (and stop); with no statistics given, the tile's own."""

    def __init__(self, known: list[tuple[Array, Array]], owned: Array | None, local: bool):
        self.known = iter(known)
        self.owned = owned  # (2, 2): rows and columns, as fractions of the window
        self.local = local

    def moments(self, x: Float[Array, "h w g cg"], ctx: Context) -> tuple[Array, Array]:
        if self.local:
            return group_moments(x, ctx.axis_name)
        stats = next(self.known, None)
        if stats is not None:
            return stats
        assert self.owned is not None
        raise _Stop(_owned_moments(x, self.owned))


def _owned_moments(x: Float[Array, "h w g cg"], owned: Array) -> tuple[Array, Array, Array]:
    """Count, mean and sum of squared deviations of each group over the owned part."""
    h, w = x.shape[:2]
    rows = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    cols = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    in_rows = (rows >= owned[0, 0]) & (rows < owned[0, 1])
    in_cols = (cols >= owned[1, 0]) & (cols < owned[1, 1])
    mask = (in_rows[:, None] & in_cols[None, :]).astype(x.dtype)[:, :, None, None]
    count = jnp.sum(mask) * x.shape[3]
    mean = jnp.sum(x * mask, axis=(0, 1, 3)) / count
    deviations = (x - mean.reshape(1, 1, -1, 1)) * mask
    return count, mean, jnp.sum(jnp.square(deviations), axis=(0, 1, 3))


def _pool(count: Array, mean: Array, squares: Array) -> tuple[Array, Array]:
    """Whole-image mean and variance from per-tile counts, means and sums of squared
    deviations (stacked over the tiles), by Chan et al.'s parallel formula."""
    total = jnp.sum(count)
    overall = jnp.sum(count[:, None] * mean, axis=0) / total
    spread = jnp.sum(squares + count[:, None] * jnp.square(mean - overall[None, :]), axis=0)
    return overall, spread / total


def _run_stage(
    stage: Callable[[Array, Context], Array],
    x: Array,
    ctx: Context,
    *,
    scale: int | float,
    tile: int,
    margin: int,
    exact: bool,
) -> Array:
    """`stage(x)` computed tile by tile (see the module's docstring)."""
    rows = _axis_tiles(x.shape[0], tile, margin)
    cols = _axis_tiles(x.shape[1], tile, margin)
    grid = [(i, j) for i in range(len(rows.starts)) for j in range(len(cols.starts))]
    window = (rows.window, cols.window)

    def per_tile(axis: _Axis, index: int) -> tuple[int, int, float, float]:
        start, write = axis.starts[index], axis.writes[index]
        cut0, cut1 = axis.cuts[index], axis.cuts[index + 1]
        return start, write, (cut0 - start) / axis.window, (cut1 - start) / axis.window

    info = [(per_tile(rows, i), per_tile(cols, j)) for i, j in grid]
    tiles = {
        "start": jnp.asarray([[r[0], c[0]] for r, c in info], jnp.int32),
        # Where the tile's output block lies within its output and in the stage's.
        "offset": jnp.asarray(
            [[round((r[1] - r[0]) * scale), round((c[1] - c[0]) * scale)] for r, c in info],
            jnp.int32,
        ),
        "target": jnp.asarray(
            [[round(r[1] * scale), round(c[1] * scale)] for r, c in info], jnp.int32
        ),
        # The owned part, as fractions of the window, for the statistics.
        "owned": jnp.asarray([[[r[2], r[3]], [c[2], c[3]]] for r, c in info], jnp.float32),
    }
    several = len(grid) > 1

    def window_of(t: dict[str, Array]) -> Array:
        origin = (t["start"][0], t["start"][1], jnp.int32(0))
        return jax.lax.dynamic_slice(x, origin, (*window, x.shape[2]))

    stats: list[tuple[Array, Array]] = []
    if exact and several:
        while True:

            def measure(t: dict[str, Array]) -> tuple[Array, Array, Array] | None:
                norm = _Statistics(stats, t["owned"], local=False)
                try:
                    stage(window_of(t), ctx.replace(norm_stats=norm))
                except _Stop as stop:
                    return stop.moments
                return None

            first = jax.tree_util.tree_map(lambda a: a[0], tiles)
            if jax.eval_shape(measure, first) is None:
                break  # every GroupNorm of the stage has its statistics
            stats.append(_pool(*jax.lax.map(measure, tiles)))

    block = (round(rows.block * scale), round(cols.block * scale))
    out_h, out_w = round(x.shape[0] * scale), round(x.shape[1] * scale)

    def step(result: Array, t: dict[str, Array]) -> tuple[Array, None]:
        norm = _Statistics(stats, None, local=not exact) if several else None
        y = stage(window_of(t), ctx.replace(norm_stats=norm))
        offset, target = t["offset"], t["target"]
        part = jax.lax.dynamic_slice(y, (offset[0], offset[1], jnp.int32(0)), (*block, y.shape[2]))
        return jax.lax.dynamic_update_slice(
            result, part, (target[0], target[1], jnp.int32(0))
        ), None

    probe = jax.eval_shape(
        lambda t: stage(window_of(t), ctx), jax.tree_util.tree_map(lambda a: a[0], tiles)
    )
    result = jnp.zeros((out_h, out_w, probe.shape[2]), probe.dtype)
    return jax.lax.scan(step, result, tiles)[0]
