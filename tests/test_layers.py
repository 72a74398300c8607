import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

import eqx_vae
from eqx_vae._norm import GROUP_NORM_EPS, group_norm
from eqx_vae._scope import Scope


def _group_norm_reference(x, groups, weight, bias, eps):
    c, h, w = x.shape
    xg = x.astype(np.float64).reshape(groups, -1)
    mean = xg.mean(axis=1, keepdims=True)
    var = xg.var(axis=1, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(c, h, w)
    return y * weight[:, None, None] + bias[:, None, None]


def _randomise(module, key):
    """Every floating leaf replaced by normal noise (GroupNorm scales around one)."""
    leaves, treedef = jax.tree_util.tree_flatten(module)
    keys = jax.random.split(key, len(leaves))
    new = [
        jax.random.normal(k, leaf.shape, leaf.dtype) * 0.2 + (1.0 if leaf.ndim == 1 else 0.0)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def test_group_norm_uses_eps_1e6_and_float32_statistics(getkey):
    norm = eqx.nn.GroupNorm(4, 8, eps=GROUP_NORM_EPS)
    norm = eqx.tree_at(
        lambda n: (n.weight, n.bias),
        norm,
        (jax.random.normal(getkey(), (8,)), jax.random.normal(getkey(), (8,))),
    )
    x = 3.0 + 0.01 * jax.random.normal(getkey(), (8, 6, 5))
    expected = _group_norm_reference(
        np.asarray(x), 4, np.asarray(norm.weight), np.asarray(norm.bias), 1e-6
    )
    scope = Scope(eqx_vae.Policy())
    assert_close(
        jnp.transpose(group_norm(norm, jnp.transpose(x, (1, 2, 0)), scope)[0], (2, 0, 1)),
        expected,
        rtol=2e-5,
    )
    # Half-precision input: statistics are still exact enough for a tiny variance
    # around a large mean, which a float16 reduction would lose entirely.
    x16 = x.astype(jnp.float16)
    out16 = group_norm(norm, jnp.transpose(x16, (1, 2, 0)), scope)[0]
    assert out16.dtype == jnp.float16
    expected16 = _group_norm_reference(
        np.asarray(x16, np.float32), 4, np.asarray(norm.weight), np.asarray(norm.bias), 1e-6
    )
    assert_close(jnp.transpose(out16, (2, 0, 1)), expected16, rtol=2e-3)


def test_every_group_norm_has_eps_1e6(getkey):
    model = eqx_vae.AutoencoderKL(
        eqx_vae.AutoencoderKLConfig(block_out_channels=(32,), norm_num_groups=8), key=getkey()
    )
    norms = [
        x
        for x in jax.tree_util.tree_leaves(
            model, is_leaf=lambda x: isinstance(x, eqx.nn.GroupNorm)
        )
        if isinstance(x, eqx.nn.GroupNorm)
    ]
    # Encoder: 1 resnet + mid (2 resnets, attention) + norm_out = 2 + 5 + 1;
    # decoder: 2 resnets + mid + norm_out = 4 + 5 + 1.
    assert len(norms) == 8 + 10
    assert all(n.eps == 1e-6 for n in norms)


def test_downsample_pads_bottom_and_right_only(getkey):
    down = eqx_vae.Downsample2D(1, key=getkey())
    # A kernel that reads the bottom-right tap: out[i, j] = x_padded[2i + 2, 2j + 2].
    weight = jnp.zeros((1, 1, 3, 3)).at[0, 0, 2, 2].set(1.0)
    down = eqx.tree_at(
        lambda d: (d.conv.weight, d.conv.bias), down, (weight, jnp.zeros((1, 1, 1)))
    )
    x = jnp.arange(1.0, 1.0 + 6 * 8).reshape(1, 6, 8)
    out = down(x)
    assert out.shape == (1, 3, 4)
    expected = np.zeros((3, 4))
    xp = np.pad(np.asarray(x[0]), ((0, 1), (0, 1)))
    for i in range(3):
        for j in range(4):
            expected[i, j] = xp[2 * i + 2, 2 * j + 2]
    np.testing.assert_array_equal(out[0], expected)
    assert out[0, -1, -1] == 0.0 and out[0, 0, 0] == x[0, 2, 2]
    # The top-left tap reads x[2i, 2j]: no padding before the first row or column.
    weight = jnp.zeros((1, 1, 3, 3)).at[0, 0, 0, 0].set(1.0)
    down = eqx.tree_at(lambda d: d.conv.weight, down, weight)
    np.testing.assert_array_equal(down(x)[0], x[0, ::2, ::2])


def test_upsample_is_nearest_then_conv(getkey):
    up = eqx_vae.Upsample2D(2, key=getkey())
    identity = jnp.zeros((2, 2, 3, 3)).at[0, 0, 1, 1].set(1.0).at[1, 1, 1, 1].set(1.0)
    up = eqx.tree_at(lambda u: (u.conv.weight, u.conv.bias), up, (identity, jnp.zeros((2, 1, 1))))
    x = jax.random.normal(getkey(), (2, 3, 5))
    np.testing.assert_array_equal(up(x), jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def test_resnet_shortcut_only_when_channels_change(getkey):
    same = eqx_vae.ResnetBlock2D(16, 16, 8, key=getkey())
    change = eqx_vae.ResnetBlock2D(16, 32, 8, key=getkey())
    assert same.conv_shortcut is None
    assert change.conv_shortcut is not None and change.conv_shortcut.weight.shape == (32, 16, 1, 1)
    x = jax.random.normal(getkey(), (16, 6, 7))
    assert same(x).shape == (16, 6, 7) and change(x).shape == (32, 6, 7)
    # With conv2 zeroed the block is the identity (or the shortcut).
    zero = eqx.tree_at(
        lambda b: (b.conv2.weight, b.conv2.bias),
        same,
        (jnp.zeros_like(same.conv2.weight), jnp.zeros((16, 1, 1))),
    )
    np.testing.assert_array_equal(zero(x), x)


@pytest.mark.slow
def test_resnet_matches_hand_computation(getkey):
    block = _randomise(eqx_vae.ResnetBlock2D(8, 16, 4, key=getkey()), getkey())
    x = jax.random.normal(getkey(), (8, 5, 6))

    def conv(c, v):
        return c(v)  # Equinox's own channels-first convolution

    def gn_silu(n, v):
        y = _group_norm_reference(
            np.asarray(v), n.groups, np.asarray(n.weight), np.asarray(n.bias), 1e-6
        )
        return jax.nn.silu(jnp.asarray(y, jnp.float32))

    h = conv(block.conv1, gn_silu(block.norm1, x))
    h = conv(block.conv2, gn_silu(block.norm2, h))
    expected = conv(block.conv_shortcut, x) + h
    assert_close(block(x), expected, rtol=1e-5)


def test_attention_matches_hand_computation(getkey):
    attn = _randomise(eqx_vae.AttentionBlock(8, 2, key=getkey()), getkey())
    x = np.asarray(jax.random.normal(getkey(), (8, 3, 4)), np.float64)
    normed = _group_norm_reference(
        x, 2, np.asarray(attn.group_norm.weight), np.asarray(attn.group_norm.bias), 1e-6
    )
    t = normed.reshape(8, 12).T

    def lin(layer, v):
        return v @ np.asarray(layer.weight, np.float64).T + np.asarray(layer.bias, np.float64)

    q, k, v = lin(attn.to_q, t), lin(attn.to_k, t), lin(attn.to_v, t)
    s = q @ k.T / np.sqrt(8)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = lin(attn.to_out[0], p @ v).T.reshape(8, 3, 4)
    assert_close(attn(jnp.asarray(x, jnp.float32)), x + out, rtol=1e-5)


def test_mid_block_attention_flag(getkey):
    with_attn = eqx_vae.MidBlock2D(16, 8, add_attention=True, key=getkey())
    without = eqx_vae.MidBlock2D(16, 8, add_attention=False, key=getkey())
    assert len(with_attn.attentions) == 1 and without.attentions == ()
    x = jax.random.normal(getkey(), (16, 4, 4))
    # The same resnets with and without attention give different outputs.
    stripped = eqx.tree_at(lambda m: m.attentions, with_attn, ())
    assert not np.allclose(with_attn(x), stripped(x))


@pytest.mark.slow
def test_encoder_decoder_structure(getkey):
    enc = eqx_vae.Encoder(3, 4, (16, 32, 64), 2, 8, key=getkey())
    assert [len(b.resnets) for b in enc.down_blocks] == [2, 2, 2]
    assert [len(b.downsamplers) for b in enc.down_blocks] == [1, 1, 0]
    assert enc.down_blocks[1].resnets[0].conv_shortcut is not None
    assert enc(jnp.zeros((3, 16, 24))).shape == (8, 4, 6)
    dec = eqx_vae.Decoder(4, 3, (16, 32, 64), 2, 8, key=getkey())
    assert [len(b.resnets) for b in dec.up_blocks] == [3, 3, 3]
    assert [len(b.upsamplers) for b in dec.up_blocks] == [1, 1, 0]
    assert [b.out_channels for b in dec.up_blocks] == [64, 32, 16]
    assert dec(jnp.zeros((4, 4, 6))).shape == (3, 16, 24)


@pytest.mark.parametrize("flag", ["use_quant_conv", "use_post_quant_conv"])
def test_quant_conv_flags(flag, getkey):
    from helpers import small_config

    on = eqx_vae.AutoencoderKL(small_config(**{flag: True}), key=getkey())
    off = eqx_vae.AutoencoderKL(small_config(**{flag: False}), key=getkey())
    attr = flag.removeprefix("use_")
    assert getattr(on, attr) is not None and getattr(off, attr) is None
    # Setting the 1x1 conv to a scaling changes the output accordingly.
    conv = getattr(on, attr)
    scaled = eqx.tree_at(
        lambda m: (getattr(m, attr).weight, getattr(m, attr).bias),
        on,
        (2.0 * jnp.eye(conv.out_channels).reshape(conv.weight.shape), jnp.zeros_like(conv.bias)),
    )
    x = jax.random.uniform(getkey(), (3, 8, 8), minval=-1, maxval=1)
    if attr == "quant_conv":
        np.testing.assert_allclose(
            scaled.encode(x).mean,
            2.0
            * eqx.tree_at(lambda m: m.quant_conv, on, None, is_leaf=lambda v: v is None)
            .encode(x)
            .mean,
            rtol=1e-6,
        )
    else:
        z = jax.random.normal(getkey(), (4, 4, 4))
        unscaled = eqx.tree_at(lambda m: m.post_quant_conv, on, None, is_leaf=lambda v: v is None)
        np.testing.assert_allclose(
            scaled.decode(z), unscaled.decode(2.0 * z), rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_dtype_argument_sets_parameter_dtype(getkey):
    from helpers import small_config

    model = eqx_vae.AutoencoderKL(small_config(), jnp.bfloat16, key=getkey())
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(model)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    # Computed in bfloat16 (the parameters' dtype), returned in float32, the dtype of
    # the activations between layers under half precision.
    out = model.decode(jnp.zeros((4, 4, 4), jnp.bfloat16))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_initialisation_matches_pytorch_defaults(getkey):
    from helpers import small_config

    model = eqx_vae.AutoencoderKL(small_config(), key=getkey())
    again = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(5678))
    assert not np.array_equal(model.encoder.conv_in.weight, again.encoder.conv_in.weight)
    conv = model.decoder.up_blocks[0].resnets[0].conv1  # 32 -> 32 channels, 3x3
    bound = 1 / np.sqrt(32 * 9)
    for values in (np.asarray(conv.weight), np.asarray(conv.bias)):
        assert values.min() >= -bound and values.max() <= bound
    assert abs(np.asarray(conv.weight).std() - bound / np.sqrt(3)) < 0.05 * bound
    linear = model.encoder.mid_block.attentions[0].to_q
    assert np.abs(np.asarray(linear.weight)).max() <= 1 / np.sqrt(32)
    norm = model.decoder.conv_norm_out
    np.testing.assert_array_equal(norm.weight, 1.0)
    np.testing.assert_array_equal(norm.bias, 0.0)
    # The same key gives the same model.
    key = getkey()
    eager = eqx_vae.AutoencoderKL(small_config(), key=key)
    np.testing.assert_array_equal(
        eager.decoder.conv_out.weight,
        eqx_vae.AutoencoderKL(small_config(), key=key).decoder.conv_out.weight,
    )


@pytest.mark.slow
@pytest.mark.parametrize("width", [16, 21, 130])
def test_winograd_convolution_equals_direct(getkey, width):
    from eqx_vae._winograd import winograd_conv3x3

    weight = jax.random.normal(getkey(), (8, 6, 3, 3)) / np.sqrt(54)
    x = jax.random.normal(getkey(), (7 + 2, width, 6))  # rows already padded
    direct = jax.lax.conv_general_dilated(
        x[None], weight, (1, 1), ((0, 0), (1, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
    )[0]
    assert_close(winograd_conv3x3(weight, x), direct, rtol=1e-5)


def test_winograd_is_used_for_wide_convolutions(getkey):
    from eqx_vae._conv import conv_algorithm

    f32 = np.dtype(np.float32)
    same = ((0, 0), (1, 1))
    default = eqx_vae.Policy()

    def winograd(weight, x, stride=(1, 1), policy=default, backend="cpu"):
        choice = conv_algorithm(weight, x, f32, same, stride, (1, 1), policy, backend)
        return choice == "winograd"

    weight = (512, 512, 3, 3)
    assert winograd(weight, (130, 128, 512))
    assert not winograd(weight, (66, 64, 512))
    assert not winograd(weight, (130, 128, 512), stride=(2, 2))
    half = eqx_vae.Policy(dtype=jnp.bfloat16)
    assert not winograd(weight, (130, 128, 512), policy=half)
    assert not winograd((128, 128, 3, 3), (130, 128, 128))
    # The heuristics are CPU measurements: elsewhere the direct convolution runs, unless
    # the policy forces an algorithm.
    assert not winograd(weight, (130, 128, 512), backend="gpu")
    assert winograd(weight, (130, 128, 512), policy=eqx_vae.Policy(conv="winograd"), backend="gpu")
    assert not winograd(weight, (130, 128, 512), policy=eqx_vae.Policy(conv="direct"))


@pytest.mark.slow
def test_few_channel_convolution_and_its_gradients_equal_direct(getkey):
    from eqx_vae._taps import taps_conv3x3

    weight = jax.random.normal(getkey(), (4, 16, 3, 3)) / np.sqrt(144)
    x = jax.random.normal(getkey(), (9 + 2, 13, 16))  # rows already padded
    cotangent = jax.random.normal(getkey(), (9, 13, 4))
    f32 = np.dtype(np.float32)

    def direct(w, v):
        return jax.lax.conv_general_dilated(
            v[None], w, (1, 1), ((0, 0), (1, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
        )[0]

    assert_close(taps_conv3x3(weight, x, f32), direct(weight, x), rtol=1e-5)
    grads = jax.grad(lambda w, v: jnp.vdot(taps_conv3x3(w, v, f32), cotangent), (0, 1))
    expected = jax.grad(lambda w, v: jnp.vdot(direct(w, v), cotangent), (0, 1))
    for got, want in zip(grads(weight, x), expected(weight, x), strict=True):
        assert_close(got, want, rtol=1e-5)


def test_few_channel_convolution_gradient_memory():
    # Differentiated as written, the shifted sum pads each of the nine taps' cotangents
    # to the size of all the taps' contributions and holds the nine together.
    from eqx_vae._taps import taps_conv3x3

    weight, x = jnp.zeros((32, 64, 3, 3)), jnp.zeros((4, 34, 32, 64))

    def loss(w, v):
        y = jax.vmap(lambda image: taps_conv3x3(w, image, np.dtype(np.float32)))(v)
        return jnp.sin(y).sum()

    analysis = jax.jit(jax.grad(loss, (0, 1))).lower(weight, x).compile().memory_analysis()
    assert analysis is not None
    contributions = 4 * 34 * 34 * 9 * 32 * 4  # bytes
    assert analysis.temp_size_in_bytes < 4 * contributions
