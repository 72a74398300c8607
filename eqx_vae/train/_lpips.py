"""LPIPS (Zhang et al., 2018) with the VGG16 trunk, as an Equinox module."""

import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._custom_types import KeyArray
from .._errors import CheckpointError


# torchvision's `vgg16().features` indices of the convolutions, and after which of them
# LPIPS takes its five feature maps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_TAPS = (1, 3, 6, 9, 12)  # positions in `_VGG_CONVS` whose ReLU output is a feature
_POOL_AFTER = (1, 3, 6, 9)  # 2x2 max pooling follows these positions
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(eqx.Module):
    """The LPIPS perceptual distance with a VGG16 trunk: each of five VGG feature maps
    normalised to unit length along the channels, the squared difference weighted by a
    learned 1x1 "linear" head, averaged over the pixels and summed.

    The trunk needs ImageNet-trained VGG16 weights (torchvision's, loaded with
    `from_files`); the heads ship with eqx_vae (from the `lpips` package, BSD licence).
    Inputs are images in `[-1, 1]`.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    lins: tuple[eqx.nn.Conv2d, ...]

    def __init__(self, *, key: KeyArray):
        """A randomly initialised trunk and heads (see `from_files` for the real ones)."""
        keys = jax.random.split(key, len(_VGG_CONVS) + len(_TAPS))
        widths = (3, *_VGG_WIDTHS)
        self.convs = tuple(
            eqx.nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, key=keys[i])
            for i in range(len(_VGG_CONVS))
        )
        self.lins = tuple(
            eqx.nn.Conv2d(_VGG_WIDTHS[t], 1, 1, use_bias=False, key=keys[len(_VGG_CONVS) + n])
            for n, t in enumerate(_TAPS)
        )

    def features(self, x: Float[Array, "3 h w"]) -> list[Array]:
        """The five VGG16 feature maps LPIPS compares."""
        shift = jnp.asarray(_SHIFT, x.dtype).reshape(3, 1, 1)
        scale = jnp.asarray(_SCALE, x.dtype).reshape(3, 1, 1)
        h = (x - shift) / scale
        out = []
        for i, conv in enumerate(self.convs):
            h = jax.nn.relu(conv(h))
            if i in _TAPS:
                out.append(h)
            if i in _POOL_AFTER:
                h = _max_pool_2x2(h)
        return out

    def __call__(self, x: Float[Array, "3 h w"], y: Float[Array, "3 h w"]) -> Float[Array, ""]:
        """The perceptual distance between two unbatched images in `[-1, 1]`."""
        total = jnp.zeros((), x.dtype)
        for fx, fy, lin in zip(self.features(x), self.features(y), self.lins, strict=True):
            difference = jnp.square(_unit_channels(fx) - _unit_channels(fy))
            total = total + jnp.mean(lin(difference))
        return total

    @classmethod
    def from_files(
        cls, vgg16: str | os.PathLike[str], heads: str | os.PathLike[str] | None = None
    ) -> "LPIPS":
        """Loads the trunk from torchvision's VGG16 weights (`vgg16-397923af.pth`, or the
        same tensors as safetensors) and the heads from the `lpips` package's
        `weights/v0.1/vgg.pth` (by default the copy shipped with eqx_vae)."""
        from ..interop._safetensors import SafetensorsFile
        from ..interop._torch_files import load_torch_file

        def read(path: Any) -> dict[str, np.ndarray]:
            if str(path).endswith(".safetensors"):
                with SafetensorsFile(path) as f:
                    return {k: v.read() for k, v in f.items()}
            return {k: np.asarray(v.float().numpy()) for k, v in load_torch_file(path).items()}

        trunk = read(vgg16)
        head = read(heads) if heads is not None else cls.shipped_heads()
        return cls.from_state_dicts(trunk, head)

    @staticmethod
    def shipped_heads() -> dict[str, np.ndarray]:
        """The `lpips` package's trained VGG heads (`weights/v0.1/vgg.pth`), shipped with
        eqx_vae, as a state dict of arrays."""
        heads = resources.files("eqx_vae.train") / "lpips_vgg_heads.npz"
        with resources.as_file(heads) as path, np.load(path) as data:
            return {k: data[k] for k in data.files}

    @classmethod
    def from_state_dicts(cls, vgg16: Mapping[str, Any], heads: Mapping[str, Any]) -> "LPIPS":
        """From torchvision's VGG16 state dict (`features.<i>.weight`/`.bias`) and the
        `lpips` package's head state dict (`lin<k>.model.1.weight`), as arrays."""
        skeleton = eqx.filter_eval_shape(cls, key=jax.random.key(0))
        problems = []
        convs = []
        for conv, index in zip(skeleton.convs, _VGG_CONVS, strict=True):
            w, b = vgg16.get(f"features.{index}.weight"), vgg16.get(f"features.{index}.bias")
            if w is None or b is None or tuple(np.shape(w)) != conv.weight.shape:
                problems.append(f"features.{index}: expected weight {conv.weight.shape}")
                continue
            convs.append(
                eqx.tree_at(
                    lambda c: (c.weight, c.bias),
                    conv,
                    (jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32).reshape(-1, 1, 1)),
                )
            )
        lins = []
        for k, lin in enumerate(skeleton.lins):
            w = heads.get(f"lin{k}.model.1.weight")
            if w is None or tuple(np.shape(w)) != lin.weight.shape:
                problems.append(f"lin{k}.model.1.weight: expected {lin.weight.shape}")
                continue
            lins.append(eqx.tree_at(lambda c: c.weight, lin, jnp.asarray(w, jnp.float32)))
        if problems:
            raise CheckpointError("Cannot load LPIPS weights: " + "; ".join(problems))
        return eqx.tree_at(lambda m: (m.convs, m.lins), skeleton, (tuple(convs), tuple(lins)))


def _unit_channels(x: Float[Array, "c h w"], eps: float = 1e-10) -> Float[Array, "c h w"]:
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=0, keepdims=True)) + eps)


def _max_pool_2x2(x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
    c, h, w = x.shape
    return jnp.max(x[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2), axis=(2, 4))
