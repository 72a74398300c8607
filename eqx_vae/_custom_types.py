from typing import Any, TypeAlias

from jaxtyping import PRNGKeyArray


# What `jnp.dtype` accepts: `jnp.float32`, `"bfloat16"`, a NumPy dtype, ...
DTypeLike: TypeAlias = Any

KeyArray: TypeAlias = PRNGKeyArray
