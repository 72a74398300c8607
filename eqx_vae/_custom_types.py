from typing import TypeAlias

from jax.typing import DTypeLike as DTypeLike
from jaxtyping import Array, PRNGKeyArray


KeyArray: TypeAlias = PRNGKeyArray

# The moments of a GroupNorm's input that a forward pass was asked to observe (see
# `eqx_vae._tiling`), keyed by the GroupNorm's place: count, mean and the sum of
# squared deviations of each group.
Observed: TypeAlias = dict[str, tuple[Array, Array, Array]]
