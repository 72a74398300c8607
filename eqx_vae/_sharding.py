"""One large image across several devices: the height is split over a mesh axis, and
the layers exchange what crosses the cut (halo rows for the convolutions, GroupNorm
sums, attention keys and values), so the result equals the single-device one."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

from ._autoencoder import AutoencoderKL, posterior
from ._block import Step
from ._checks import check_input
from ._custom_types import DTypeLike
from ._distribution import DiagonalGaussian
from ._halo import to_chw
from ._policy import Policy


def sharded_decode(
    model: AutoencoderKL,
    z: Float[Array, "c h w"],
    mesh: Mesh,
    axis_name: str,
    *,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
) -> Float[Array, "o H W"]:
    """Decodes one latent with its height split over the devices of `mesh` along
    `axis_name`.

    Each device holds `1/n` of every activation, plus the parameters and, in the
    mid-block attention, the keys and values of the whole latent. The convolutions
    exchange one row with each neighbouring device, GroupNorm statistics are summed
    over the devices, and attention gathers the keys: the result equals
    `model.decode(z)` up to floating-point reordering.

    **Arguments:**

    - `model`: the autoencoder (replicated onto every device).
    - `z`: an unbatched latent `(latent_channels, height, width)`; `height` must be a
        multiple of the number of devices along `axis_name`.
    - `mesh`: a `jax.sharding.Mesh`; other mesh axes see replicated work.
    - `axis_name`: the mesh axis to split the height over.
    - `dtype`, `policy`: how to run, as in [`eqx_vae.AutoencoderKL.decode`][]; the
        policy's `axis_name` is set to `axis_name`.

    **Returns:**

    The image `(out_channels, height * f, width * f)`, sharded over `axis_name` along
    its height.

    !!! Example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("rows",))
        image = eqx.filter_jit(eqx_vae.sharded_decode)(model, z, mesh, "rows")
        ```
    """
    check_input(z, "sharded_decode", "latent", model.latent_channels, 1)
    _check_rows(z.shape[1], mesh, axis_name, 1, "latent")
    policy = model.resolve_policy(policy, dtype=dtype).replace(axis_name=axis_name)
    return _run(model, AutoencoderKL._decode_steps, to_chw, mesh, policy, z)


def sharded_encode(
    model: AutoencoderKL,
    x: Float[Array, "c H W"],
    mesh: Mesh,
    axis_name: str,
    *,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
) -> DiagonalGaussian:
    """Encodes one image with its height split over the devices of `mesh` along
    `axis_name`; the counterpart of [`eqx_vae.sharded_decode`][]. The height must be a
    multiple of `spatial_factor` times the number of devices along `axis_name`.

    **Returns:**

    The posterior, its arrays sharded over `axis_name` along the height.
    """
    check_input(x, "sharded_encode", "image", model.in_channels, model.spatial_factor)
    _check_rows(x.shape[1], mesh, axis_name, model.spatial_factor, "image")
    policy = model.resolve_policy(policy, dtype=dtype).replace(axis_name=axis_name)
    return _run(model, AutoencoderKL._encode_steps, posterior, mesh, policy, x)


def _run(
    model: AutoencoderKL,
    steps: Callable[[AutoencoderKL], tuple[Step, ...]],
    finish: Callable[[Array], Any],
    mesh: Mesh,
    policy: Policy,
    array: Array,
) -> Any:
    """`finish` of the model's `steps` on each device's rows under `shard_map`, with the
    parameters replicated and the array's height split over `policy.axis_name`."""
    params, static = eqx.partition(model, eqx.is_array)

    def local(params: AutoencoderKL, rows: Array) -> Any:
        m = eqx.combine(params, static)
        return finish(m._run(steps(m), rows, policy))

    rows = P(None, policy.axis_name, None)
    # device_put places (or, under jit, constrains) the inputs as shard_map expects
    # them, whether the mesh's axes are explicit or automatic.
    params = jax.device_put(params, NamedSharding(mesh, P()))
    array = jax.device_put(array, NamedSharding(mesh, rows))
    run = jax.shard_map(local, mesh=mesh, in_specs=(P(), rows), out_specs=rows)
    return run(params, array)


def _check_rows(height: int, mesh: Mesh, axis_name: str, multiple: int, what: str) -> None:
    if axis_name not in mesh.shape:
        raise ValueError(
            f"`axis_name={axis_name!r}` is not an axis of the mesh {dict(mesh.shape)}."
        )
    devices = mesh.shape[axis_name]
    if height % (devices * multiple):
        raise ValueError(
            f"The {what} height {height} cannot be split evenly over {devices} devices"
            + (f" in multiples of {multiple} rows" if multiple > 1 else "")
            + f"; pad it to a multiple of {devices * multiple}."
        )
