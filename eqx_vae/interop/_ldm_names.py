"""The parameter names of original (LDM) checkpoints, and how they map to diffusers'."""

import dataclasses
import re
from typing import Any

import numpy as np

from .._config import AutoencoderKLConfig
from .._state_dict import abstract_model, named_parameters


# Diffusers -> LDM name substitutions, applied in order.
_TO_LDM = (
    (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1."),
    (r"\.resnets\.(\d+)\.(?=norm|conv)", r".block.\1."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.mid_block\.block\.0\.", ".mid.block_1."),
    (r"\.mid_block\.block\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
)


def to_ldm_name(name: str, levels: int, *, inner_quant_convs: bool = False) -> str:
    """The LDM name of a diffusers parameter name. The decoder's levels are numbered
    from the latent side in diffusers and from the image side in LDM. With
    `inner_quant_convs` (FLUX.2's original layout) the 1x1 convolutions around the
    latent belong to the encoder and decoder: `encoder.quant_conv`,
    `decoder.post_quant_conv`. FLUX.2's BatchNorm statistics keep their names
    (`bn.running_mean`, ...)."""
    if inner_quant_convs:
        name = re.sub(r"^(post_)?quant_conv\.", _inner_quant_conv, name)
    name = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", name
    )
    for pattern, replacement in _TO_LDM:
        name = re.sub(pattern, replacement, name)
    return name


def _inner_quant_conv(match: re.Match[str]) -> str:
    return "decoder.post_quant_conv." if match[1] else "encoder.quant_conv."


def inner_quant_convs(config: AutoencoderKLConfig) -> bool:
    """Whether original files of this family keep the quant convs inside the encoder
    and decoder: FLUX.2's do (its reference code builds them there)."""
    return config.patch_size is not None


def ldm_names(config: AutoencoderKLConfig) -> dict[str, str]:
    """LDM name -> diffusers name, for every parameter of a model with `config`."""
    levels = len(config.block_out_channels)
    inner = inner_quant_convs(config)
    return {
        to_ldm_name(name, levels, inner_quant_convs=inner): name
        for name, _ in named_parameters(abstract_model(config))
    }


ATTENTION_CONV = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


@dataclasses.dataclass(frozen=True)
class _Squeezed:
    """A `(C, C, 1, 1)` convolution weight read as the `(C, C)` linear weight it is."""

    tensor: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape[:2])

    @property
    def dtype(self) -> Any:
        return self.tensor.dtype

    def read(self) -> np.ndarray:
        read = getattr(self.tensor, "read", None)
        array: np.ndarray
        if callable(read):
            array = np.asarray(read())
        elif hasattr(self.tensor, "detach"):  # a torch tensor; NumPy has no bfloat16
            array = np.array(self.tensor.detach().cpu().float().numpy())
        else:
            array = np.array(self.tensor)
        return array.reshape(self.shape)


def squeeze_attention(name: str, tensor: Any) -> Any:
    """The LDM attention projections are 1x1 convolutions; diffusers' are linear maps.
    Only exactly `(C, C, 1, 1)` is squeezed; any other shape is left to be reported."""
    shape = tuple(getattr(tensor, "shape", ()))
    if ATTENTION_CONV.fullmatch(name) and len(shape) == 4 and shape[2:] == (1, 1):
        return _Squeezed(tensor)
    return tensor
