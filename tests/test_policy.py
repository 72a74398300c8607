"""One call surface: every block is called as `block(x, policy=...)`, and the policy
means the same thing in a block of one's own model as inside `AutoencoderKL`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, small_config

import eqx_vae


@pytest.fixture(scope="module")
def model():
    config = small_config(force_upcast=False, use_post_quant_conv=False, use_quant_conv=False)
    return eqx_vae.AutoencoderKL(config, key=jax.random.key(0))


def test_policy_checks_its_fields(without_typechecks):
    with pytest.raises(ValueError, match="must be floating point"):
        eqx_vae.Policy(dtype=jnp.int32)
    with pytest.raises(ValueError, match="`conv` must be one of"):
        eqx_vae.Policy(conv="fft")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`attention` must be one of"):
        eqx_vae.Policy(attention="flash")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`attention_block_bytes` must be a positive"):
        eqx_vae.Policy(attention_block_bytes=0)
    with pytest.raises(ValueError, match="`checkpoint` must be a bool"):
        eqx_vae.Policy(checkpoint=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"`norm_stats\['a'\]` must be a \(mean, variance\)"):
        eqx_vae.Policy(norm_stats={"a": jnp.zeros(2)})  # pyright: ignore[reportArgumentType]
    policy = eqx_vae.Policy(dtype="bfloat16")
    assert policy.dtype == jnp.bfloat16 and policy.replace(dtype=None).dtype is None
    assert policy.stream_dtype(jnp.bfloat16) == jnp.float32
    assert eqx_vae.Policy().stream_dtype(jnp.bfloat16) == jnp.bfloat16


def test_dtype_and_policy_are_given_once(model):
    z = jnp.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="give the compute dtype in one place"):
        model.decode(z, dtype=jnp.float32, policy=eqx_vae.Policy(dtype=jnp.bfloat16))
    # The same dtype twice is no contradiction.
    model.decode(z, dtype=jnp.bfloat16, policy=eqx_vae.Policy(dtype=jnp.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_blocks_run_the_models_policy(model, dtype):
    """The encoder and decoder, called as blocks under a policy, compute exactly what the
    model computes under that policy (this config has no quant convs)."""
    policy = eqx_vae.Policy(dtype=dtype)
    z = jax.random.normal(jax.random.key(1), (4, 6, 5))
    x = jax.random.uniform(jax.random.key(2), (3, 12, 10), minval=-1, maxval=1)
    block = eqx.filter_jit(lambda b, v, p: b(v, policy=p))
    np.testing.assert_array_equal(
        block(model.decoder, z, policy), eqx.filter_jit(model.decode)(z, policy=policy)
    )
    moments = block(model.encoder, x, policy)
    posterior = eqx.filter_jit(model.encode)(x, policy=policy)
    np.testing.assert_array_equal(moments[:4], posterior.mean)
    # Half precision: float32 between layers, and close to the float32 result.
    assert moments.dtype == jnp.float32
    assert_close(block(model.decoder, z, policy), model.decode(z), rtol=3e-2)


@pytest.mark.slow
def test_every_block_takes_a_policy_and_no_second_call(getkey):
    x = jax.random.normal(getkey(), (16, 8, 6))
    blocks = [
        eqx_vae.ResnetBlock2D(16, 32, 8, key=getkey()),
        eqx_vae.AttentionBlock(16, 8, key=getkey()),
        eqx_vae.Downsample2D(16, key=getkey()),
        eqx_vae.Upsample2D(16, key=getkey()),
        eqx_vae.MidBlock2D(16, 8, key=getkey()),
        eqx_vae.DownEncoderBlock2D(16, 32, 2, 8, key=getkey()),
        eqx_vae.UpDecoderBlock2D(16, 32, 2, 8, key=getkey()),
        eqx_vae.Encoder(16, 4, (16, 32), 1, 8, key=getkey()),
        eqx_vae.Decoder(16, 3, (16, 32), 1, 8, key=getkey()),
    ]
    half = eqx_vae.Policy(dtype=jnp.bfloat16)
    for block in blocks:
        assert not any(name.endswith("_hwc") for name in dir(block))
        full = block(x)
        out = block(x, policy=half)
        assert out.dtype == jnp.float32 and out.shape == full.shape
        assert_close(out, full, rtol=5e-2, what=type(block).__name__)


def test_wrong_channels_are_a_type_error(getkey):
    from jaxtyping import TypeCheckError

    block = eqx_vae.ResnetBlock2D(16, 32, 8, key=getkey())
    with pytest.raises(TypeCheckError):
        block(jnp.zeros((8, 4, 4)))


def test_attention_algorithms_agree(getkey):
    attention = eqx_vae.AttentionBlock(32, 8, key=getkey())
    x = jax.random.normal(getkey(), (32, 9, 7))
    blocked = attention(x, policy=eqx_vae.Policy(attention="blocked"))
    xla = attention(x, policy=eqx_vae.Policy(attention="xla"))
    assert_close(xla, blocked, rtol=1e-5)


def test_attention_algorithm_choice():
    from eqx_vae._attention import attention_algorithm

    auto = eqx_vae.Policy()
    assert attention_algorithm(64, 64, auto, backend="cpu") == "blocked"
    assert attention_algorithm(64, 64, auto, backend="gpu") == "xla"
    assert attention_algorithm(2**14, 2**14, auto, backend="gpu") == "blocked"  # 1 GiB
    assert attention_algorithm(64, 64, eqx_vae.Policy(dtype=jnp.float16), backend="gpu") == (
        "blocked"
    )
    assert attention_algorithm(64, 64, eqx_vae.Policy(attention="xla"), backend="cpu") == "xla"


def test_unsupported_convolutions_are_refused(getkey):
    down = eqx_vae.Downsample2D(4, key=getkey())
    grouped = eqx.nn.Conv2d(4, 4, 3, stride=2, padding=((0, 1), (0, 1)), groups=2, key=getkey())
    with pytest.raises(ValueError, match="groups=2"):
        eqx.tree_at(lambda d: d.conv, down, grouped)(jnp.zeros((4, 8, 8)))
    circular = eqx.nn.Conv2d(4, 4, 3, padding=1, padding_mode="CIRCULAR", key=getkey())
    up = eqx.tree_at(lambda u: u.conv, eqx_vae.Upsample2D(4, key=getkey()), circular)
    with pytest.raises(ValueError, match="padding_mode='CIRCULAR'"):
        up(jnp.zeros((4, 8, 8)))


def test_norm_stats_replace_the_inputs(getkey):
    block = eqx_vae.ResnetBlock2D(16, 16, 4, key=getkey())
    x = 3.0 + jax.random.normal(getkey(), (16, 6, 6))
    groups = np.asarray(x, np.float64).reshape(4, -1)
    own = {
        "norm1": (
            jnp.asarray(groups.mean(1), jnp.float32),
            jnp.asarray(groups.var(1), jnp.float32),
        )
    }
    # The input's own statistics, given explicitly, change nothing ...
    assert_close(block(x, policy=eqx_vae.Policy(norm_stats=own)), block(x), rtol=1e-5)
    # ... and others change the result.
    other = {"norm1": (jnp.zeros(4), jnp.ones(4))}
    assert not np.allclose(block(x, policy=eqx_vae.Policy(norm_stats=other)), block(x))
