import functools

import jax
import jax.numpy as jnp


# On CPU, XLA sends convolutions and matmuls to YNNPACK by default; for this model's
# shapes its own (Eigen) kernels are 10-40% faster, depending on the processor.
_CPU_OPTIONS: dict[str, str | bool] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> dict[str, str | bool]:
    """XLA compiler options under which this model runs fastest on `backend` (by
    default JAX's default backend), for `jax.jit(..., compiler_options=...)` or
    `eqx.filter_jit(..., compiler_options=...)`. Empty where there is nothing to set,
    or where the installed jaxlib does not know the option.

    !!! Example

        ```python
        decode = eqx.filter_jit(model.decode, compiler_options=eqx_vae.compiler_options())
        ```
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return dict(_CPU_OPTIONS) if _cpu_options_supported() else {}


@functools.cache
def _cpu_options_supported() -> bool:
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(1)).compile(compiler_options=_CPU_OPTIONS)
    except Exception:  # an unknown option or value: an older or newer jaxlib
        return False
    return True
