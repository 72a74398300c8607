"""What a layer needs to know about the forward pass it is part of: the policy, its own
place in the module called, and whether tiling asked it to observe statistics."""

import equinox as eqx
from jaxtyping import Array, Float

from ._policy import Policy


class Scope(eqx.Module):
    """The [`eqx_vae.Policy`][] of a forward pass, seen from one module: `place` is that
    module's attribute path from the module called (`"up_blocks.1.resnets.0"`), which
    keys its GroupNorms' entries in `policy.norm_stats`. With `owned` set (by tiling),
    every GroupNorm also reports the moments of its input over the owned part of the
    tile, as fractions of the tile's rows and columns (`[[top, bottom], [left, right]]`).
    A pytree, created afresh by every call: nothing in it is consumed or mutated."""

    policy: Policy
    owned: Float[Array, "2 2"] | None = None
    place: str = eqx.field(default="", static=True)

    def name(self, local: str) -> str:
        """The place of the attribute `local` of this module."""
        return f"{self.place}.{local}" if self.place else local

    def child(self, local: str) -> "Scope":
        return Scope(self.policy, self.owned, self.name(local))

    def without_checkpoint(self) -> "Scope":
        return Scope(self.policy.replace(checkpoint=False), self.owned, self.place)
