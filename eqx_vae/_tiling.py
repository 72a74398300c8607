"""Encoding and decoding images larger than memory allows in one piece, with the same
result as in one piece.

The model is cut where its modules begin and end: the forward pass is the model's
steps (`AutoencoderKL._decode_steps()`), and every step that changes the resolution
(the decoder, the encoder, their levels) is replaced by its own steps, down to the
upsamplers and downsamplers. What needs the whole image (the mid block, with its
attention) then runs whole; it sits at the latent's resolution, where it is small. The
other steps are grouped into stages cut where the maps are smallest (a stage begins
with an upsampler and ends with a downsampler), and each stage runs tile by tile over
its input, which is kept whole: every tile reads its part of the input plus a
margin wider than the stage's receptive field (counted from the stage's convolutions)
and contributes only the part it owns to the stage's output, so the convolutions see
exactly what they would see untiled. GroupNorm needs the statistics of the whole image:
within a stage they are found one GroupNorm after another, each time running the tiles
with the statistics already known and pooling the moments of the parts the tiles own
(see `eqx_vae._tiles`); the last pass gets them as `Policy.norm_stats`. A stage with
`G` GroupNorms costs about `G / 2 + 1` runs of itself, but memory stays that of one
tile plus the stage's input and output.
"""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float

from ._autoencoder import AutoencoderKL, posterior
from ._block import Block, SequentialBlock, Step, run_steps, substeps
from ._checks import check_input
from ._custom_types import DTypeLike
from ._distribution import DiagonalGaussian
from ._halo import to_chw
from ._policy import Policy
from ._scope import Scope
from ._tiles import run_stage


def tiled_decode(
    model: AutoencoderKL,
    z: Float[Array, "c h w"],
    *,
    tile_size: int = 512,
    exact_statistics: bool = True,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
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
    - `dtype`, `policy`: how to run, as in [`eqx_vae.AutoencoderKL.decode`][];
        `Policy(checkpoint=True)` makes the tiled decode differentiable in bounded
        memory.

    **Returns:**

    The image `(out_channels, height * f, width * f)`.

    !!! Example

        ```python
        decode = eqx.filter_jit(eqx_vae.tiled_decode, compiler_options=eqx_vae.compiler_options())
        image = decode(model, z)  # z: (4, 256, 256) -> a 2048x2048 image
        ```
    """
    check_input(z, "tiled_decode", "latent", model.latent_channels, 1)
    check_tile(tile_size)
    policy = model.resolve_policy(policy, dtype=dtype)
    steps = model._decode_steps()
    return to_chw(run_tiled(steps, model._prepare(z, policy), policy, tile_size, exact_statistics))


def tiled_encode(
    model: AutoencoderKL,
    x: Float[Array, "c H W"],
    *,
    tile_size: int = 512,
    exact_statistics: bool = True,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
) -> DiagonalGaussian:
    """Encodes an image tile by tile, in memory bounded by the tile size, with the same
    result as `model.encode(x)`; the counterpart of [`eqx_vae.tiled_decode`][].

    **Arguments:**

    - `x`: an unbatched image `(in_channels, height, width)`, height and width
        multiples of `spatial_factor`.
    - `tile_size`: the largest tile, in pixels of each stage's input (the image for
        the first stage).
    - `exact_statistics`, `dtype`, `policy`: as in `tiled_decode`.

    **Returns:**

    The posterior over the whole latent.
    """
    check_input(x, "tiled_encode", "image", model.in_channels, model.spatial_factor)
    check_tile(tile_size)
    policy = model.resolve_policy(policy, dtype=dtype)
    steps = model._encode_steps()
    return posterior(
        run_tiled(steps, model._prepare(x, policy), policy, tile_size, exact_statistics)
    )


def check_tile(tile_size: int, multiple: int = 2) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int):
        raise ValueError(f"`tile_size` must be an int, got {tile_size!r}.")
    if tile_size < 4 * multiple or tile_size % multiple:
        raise ValueError(
            f"`tile_size={tile_size}` must be a multiple of {multiple} and at least "
            f"{4 * multiple}."
        )


def run_tiled(
    steps: Sequence[Step], x: Array, policy: Policy, tile_size: int, exact: bool
) -> Array:
    """The steps on a channels-last input, stage by stage (see the module's docstring)."""
    scope = Scope(policy)
    for whole, stage in stages(steps):
        if whole:
            x, _ = run_steps(stage, x, scope)
            continue
        scale = math.prod(scale_of(step.module) for step in stage)
        x = run_stage(
            lambda window, s, stage=stage: run_steps(stage, window, s),
            x,
            scope,
            scale=scale,
            tile=round(tile_size / max(1.0, scale)),
            margin=math.ceil(steps_reach(stage)),
            exact=exact,
        )
    return x


def stages(steps: Sequence[Step]) -> list[tuple[bool, list[Step]]]:
    """The steps, refined down to the parts that change the resolution, grouped into
    `(whole, steps)`: a step that needs the whole image alone, or a stage of local steps.
    Stages are cut where the maps are smallest: a stage begins with an upsampling step
    and ends with a downsampling one, so that the maps of higher resolution only ever
    exist tile by tile."""
    out: list[tuple[bool, list[Step]]] = []
    current: list[Step] = []

    def close() -> None:
        if current:
            out.append((False, list(current)))
            current.clear()

    for step in _refine(steps):
        if not is_local(step.module):
            close()
            out.append((True, [step]))
            continue
        scale = scale_of(step.module)
        if scale > 1:
            close()
        current.append(step)
        if scale < 1:
            close()
    close()
    return out


def _refine(steps: Sequence[Step]) -> list[Step]:
    out = []
    for step in steps:
        if isinstance(step.module, SequentialBlock) and scale_of(step.module) != 1:
            out.extend(_refine(substeps(step)))
        else:
            out.append(step)
    return out


def is_local(module: Any) -> bool:
    """Whether each output pixel depends only on nearby input pixels (and GroupNorm
    statistics): no block inside mixes the whole image."""
    leaves = jax.tree_util.tree_leaves(
        module, is_leaf=lambda m: isinstance(m, Block) and m._whole_image
    )
    return not any(isinstance(leaf, Block) for leaf in leaves)


def scale_of(module: Any) -> float:
    """How much the module multiplies the height and width by."""
    if isinstance(module, SequentialBlock):
        return math.prod(scale_of(step.module) for step in module._steps())
    if isinstance(module, Block):
        return module._scale
    if isinstance(module, eqx.nn.Conv2d):
        return 1.0 / module.stride[0]
    return 1.0


def steps_reach(steps: Sequence[Step]) -> float:
    """How far (in input pixels) an output pixel of the steps can see."""
    total, resolution = 0.0, 1.0
    for step in steps:
        total += reach(step.module) / resolution
        resolution *= scale_of(step.module)
    return total


def reach(module: Any) -> float:
    """How far (in input pixels) an output pixel of the module can see: the sum of its
    convolutions' reaches (those of an upsampling block run on the upsampled map)."""
    if isinstance(module, SequentialBlock):
        return steps_reach(module._steps())
    convs = jax.tree_util.tree_leaves(module, is_leaf=lambda m: isinstance(m, eqx.nn.Conv2d))
    total = 0.0
    for conv in convs:
        if isinstance(conv, eqx.nn.Conv2d):
            lows = [int(lo) for lo, _ in conv.padding]  # pyright: ignore[reportGeneralTypeIssues]
            spans = [(k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
            total += max(max(lo, span - lo) for lo, span in zip(lows, spans, strict=True))
    scale = scale_of(module)
    return total / scale if scale > 1 else total
