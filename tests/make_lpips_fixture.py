"""Writes `tests/fixtures/lpips_vgg.npz`: the `lpips` package's distances (and VGG16
feature maps) for two pairs of images, with a VGG16 trunk of seeded random weights and
the package's own trained linear heads.

The `lpips` package needs torchvision, which CI does not install; the fixture is
committed and this script regenerates it:

    python -m venv /tmp/lpips-env
    /tmp/lpips-env/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips numpy
    /tmp/lpips-env/bin/python tests/make_lpips_fixture.py

The trunk weights are not stored (60 MB): `trunk_state_dict()` regenerates them from a
bit-stable generator, here and in the test.
"""

import pathlib

import numpy as np


FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "lpips_vgg.npz"
_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_WIDTHS = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _uniform(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform in [-1, 1) from PCG64's raw output: the same bits on every NumPy version
    (unlike the distribution methods, whose streams may change)."""
    raw = np.random.PCG64(seed).random_raw(int(np.prod(shape)))
    return ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0).reshape(shape)


def trunk_state_dict() -> dict[str, np.ndarray]:
    """torchvision `vgg16().features` weights, He-uniform scaled so activations keep
    their size through the 13 layers."""
    out = {}
    for n, index in enumerate(_CONVS):
        cin, cout = _WIDTHS[n], _WIDTHS[n + 1]
        bound = np.sqrt(6.0 / (cin * 9))
        out[f"features.{index}.weight"] = (bound * _uniform(100 + n, (cout, cin, 3, 3))).astype(
            np.float32
        )
        out[f"features.{index}.bias"] = (0.1 * _uniform(200 + n, (cout,))).astype(np.float32)
    return out


def images() -> tuple[np.ndarray, np.ndarray]:
    """Two pairs of 3x48x40 images in [-1, 1]: a smooth pattern and a perturbed copy."""
    y, x = np.mgrid[0:48, 0:40] / 40.0
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), np.sin(3 * (x + y)) * 0.8])
    first = np.stack([base, -base])
    second = np.clip(first + 0.3 * _uniform(300, first.shape), -1, 1)
    return first.astype(np.float32), second.astype(np.float32)


def main() -> None:
    import lpips  # pyright: ignore[reportMissingImports]
    import torch

    torch.set_grad_enabled(False)
    metric = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = trunk_state_dict()
    # lpips splits torchvision's `features` into five slices keeping the indices.
    loaded = 0
    for slice_index in range(1, 6):
        part = getattr(metric.net, f"slice{slice_index}")
        for name, module in part.named_children():
            if isinstance(module, torch.nn.Conv2d):
                assert module.bias is not None
                module.weight.copy_(torch.from_numpy(trunk[f"features.{name}.weight"]))
                module.bias.copy_(torch.from_numpy(trunk[f"features.{name}.bias"]))
                loaded += 1
    assert loaded == len(_CONVS)
    x, y = images()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    distance = metric(tx, ty).reshape(-1).numpy()
    scaled = metric.scaling_layer(tx)
    feats = metric.net.forward(scaled)
    out = {"x": x, "y": y, "distance": distance}
    for i, f in enumerate(feats):
        out[f"features_{i}"] = f[0].numpy()
    # The heads the package loaded are the ones eqx_vae ships.
    shipped = pathlib.Path(__file__).parents[1] / "eqx_vae" / "train" / "lpips_vgg_heads.npz"
    with np.load(shipped) as heads:
        for k in range(5):
            head = getattr(metric, f"lin{k}").model[1].weight.numpy()
            np.testing.assert_array_equal(heads[f"lin{k}.model.1.weight"], head)
    np.savez_compressed(FIXTURE, **out)
    print(f"wrote {FIXTURE}: distances {distance}")


if __name__ == "__main__":
    main()
