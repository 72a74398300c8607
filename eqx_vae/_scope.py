"""What a layer needs to know about the forward pass it is part of: the policy, its own
place in the module called, whether tiling asked it to observe statistics, and which
part of a padded map holds the image."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._policy import Policy


class Scope(eqx.Module):
    """The [`eqx_vae.Policy`][] of a forward pass, seen from one module: `place` is that
    module's attribute path from the module called (`"up_blocks.1.resnets.0"`), which
    keys its GroupNorms' entries in `policy.norm_stats`. With `owned` set (by tiling),
    every GroupNorm also reports the moments of its input over the owned part of the
    tile, as fractions of the tile's rows and columns (`[[top, bottom], [left, right]]`).
    With `valid` set (by bucketing), only the top-left part of every map holds the
    image, as fractions of its rows and columns; the rest is padding that no output
    pixel of that part may see: convolutions read zeros there, GroupNorm statistics
    and attention keys leave it out, so the valid part equals the result of the image
    alone. A pytree, created afresh by every call: nothing in it is consumed or
    mutated."""

    policy: Policy
    owned: Float[Array, "2 2"] | None = None
    place: str = eqx.field(default="", static=True)
    valid: Float[Array, "2"] | None = None

    def name(self, local: str) -> str:
        """The place of the attribute `local` of this module."""
        return f"{self.place}.{local}" if self.place else local

    def child(self, local: str) -> "Scope":
        return Scope(self.policy, self.owned, self.name(local), self.valid)

    def without_checkpoint(self) -> "Scope":
        return Scope(self.policy.replace(checkpoint=False), self.owned, self.place, self.valid)

    def valid_mask(self, height: int, width: int) -> Array | None:
        """Whether each pixel of a `(height, width)` map lies in the valid part (a
        boolean `(height, width)` array), or `None` when the whole map is valid."""
        if self.valid is None:
            return None
        rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height < self.valid[0]
        cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width < self.valid[1]
        return rows[:, None] & cols[None, :]

    def zero_padding(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        """`x` with zeros outside the valid part: what a convolution must read there
        for the valid part to equal the image's own result."""
        mask = self.valid_mask(x.shape[0], x.shape[1])
        return x if mask is None else jnp.where(mask[:, :, None], x, jnp.zeros((), x.dtype))
