"""The model under JAX's transformations and device placement: `filter_jit`, `vmap`,
`filter_grad`, `filter_pmap` and `jax.sharding`, each agreeing with the plain result."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eqx_vae


@pytest.fixture(scope="module")
def model():
    return eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (8, 3, 16, 8), minval=-1, maxval=1)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    assert float(np.max(np.abs(a - b))) <= rtol * scale


@pytest.mark.slow
def test_jit_equals_eager(model, images):
    x = images[0]
    _close(eqx.filter_jit(model.encode)(x).mean, model.encode(x).mean)
    z = model.encode(x).mode()
    _close(eqx.filter_jit(model.decode)(z), model.decode(z))


@pytest.mark.slow
def test_vmap_equals_loop(model, images):
    batched = jax.vmap(model)(images)
    for i in (0, 5):
        _close(batched[i], model(images[i]))


def test_sampling_key_changes_reconstruction(model, images, getkey):
    x = images[0]
    assert not np.allclose(model(x, key=getkey()), model(x))
    key = getkey()
    np.testing.assert_array_equal(
        eqx.filter_jit(model)(x, key=key), eqx.filter_jit(model)(x, key=key)
    )


@pytest.mark.slow
def test_filter_grad_matches_finite_differences(getkey):
    model = eqx_vae.AutoencoderKL(
        small_config(block_out_channels=(8,), norm_num_groups=4), key=getkey()
    )
    x = jax.random.uniform(getkey(), (3, 4, 4), minval=-1, maxval=1)

    @eqx.filter_value_and_grad
    def loss(m, x):
        posterior = m.encode(x)
        return jnp.mean((m.decode(posterior.mode()) - x) ** 2) + 1e-3 * posterior.kl()

    value, grads = eqx.filter_jit(loss)(model, x)
    assert jnp.isfinite(value)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    # Directional derivative along a random direction, by central differences in float64.
    direction = jax.tree_util.tree_map(lambda g: jax.random.normal(getkey(), g.shape), grads)
    analytic = sum(
        float(jnp.vdot(g, d))
        for g, d in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction), strict=True
        )
    )
    with _enable_x64():
        m64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model)
        d64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), direction)
        x64 = x.astype(jnp.float64)
        eps = 1e-4

        def value_at(t):
            shifted = jax.tree_util.tree_map(lambda a, d: a + t * d, m64, d64)
            return float(eqx.filter_jit(loss)(shifted, x64)[0])

        numeric = (value_at(eps) - value_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3)


def test_filter_pmap_equals_vmap(model, images):
    n = jax.device_count()
    assert n >= 8, "conftest asks for 8 CPU devices"
    out = eqx.filter_pmap(model)(images[:8])
    _close(out, jax.vmap(model)(images[:8]))


@pytest.mark.parametrize("num_devices", [4, 8])
def test_batch_sharded_jit_equals_single_device(model, images, num_devices):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("batch",))
    sharded = jax.device_put(images, NamedSharding(mesh, P("batch")))
    replicated = eqx.filter_shard(model, NamedSharding(mesh, P()))

    @eqx.filter_jit
    def reconstruct(m, x):
        x = eqx.filter_shard(x, NamedSharding(mesh, P("batch")))
        return jax.vmap(m.decode)(jax.vmap(m.encode)(x).mode())

    out = reconstruct(replicated, sharded)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), out.ndim)
    assert len(out.sharding.device_set) == num_devices
    _close(out, jax.vmap(model)(images))


def _enable_x64():
    """`jax.enable_x64(True)` (jax 0.8 and later), or the experimental context manager
    of the older releases the package supports."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # pyright: ignore[reportAttributeAccessIssue]

    return enable_x64()
