"""Original single-file checkpoints: CompVis/SGM `.ckpt`/`.safetensors` (whole models
with a `first_stage_model.` prefix, or VAE-only files such as `sd-vae-ft-mse`), FLUX.1's
and FLUX.2's `ae.safetensors` and SD3 files with a `vae.` prefix, all with the LDM
parameter names (FLUX.2's with its quant convs inside the encoder and decoder and its
BatchNorm statistics under `bn.`)."""

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._autoencoder import AutoencoderKL
from .._config import PRESETS, AutoencoderKLConfig
from .._custom_types import DTypeLike
from .._errors import CheckpointError
from .._state_dict import (
    from_diffusers_state_dict,
    to_diffusers_state_dict,
)
from ._ldm_names import (
    ATTENTION_CONV,
    inner_quant_convs,
    ldm_names,
    squeeze_attention,
    to_ldm_name,
)
from ._path_first import path_first
from ._safetensors import SafetensorsFile, looks_like_safetensors, write_safetensors
from ._torch_files import PICKLE_SUFFIXES, load_torch_file, looks_like_torch_file


_PREFIXES = ("first_stage_model.", "vae.")
# Parts of VAE training checkpoints that are not the autoencoder.
_IGNORED = ("loss.", "model_ema.")
# Keys of whole-model checkpoints that identify the family, checked in this order.
_FAMILY_MARKERS = (
    ("edm_mean", "playground25"),
    ("conditioner.embedders.1.", "sdxl"),
    ("model.diffusion_model.joint_blocks.", "sd3"),
    ("double_blocks.", "flux1"),
    ("cond_stage_model.model.transformer.", "sd2"),
    ("cond_stage_model.transformer.", "sd15"),
)
# GroupNorm groups are not stored in a checkpoint; every published model uses 32.
_DEFAULT_GROUPS = 32


def load_single_file(
    path: str | os.PathLike[str],
    *,
    config: AutoencoderKLConfig | Mapping[str, Any] | None = None,
    preset: str | None = None,
    dtype: DTypeLike | None = None,
    check_finite: bool = False,
) -> AutoencoderKL:
    """Loads the autoencoder of an original (CompVis, SGM, FLUX) single-file checkpoint.

    The architecture (channels, levels, layers per block, latent channels, quant convs,
    mid attention, a narrower decoder) is read off the tensor shapes. The latent
    scaling cannot be: it comes from `preset` or `config`, or, for whole-model
    checkpoints, from the model family their other weights identify. A VAE-only file
    without either raises, except FLUX.2's: its latent normalisation is the BatchNorm
    statistics it holds (`bn.running_mean`, `bn.running_var`), so it needs neither.

    **Arguments:**

    - `path`: a safetensors file or a PyTorch checkpoint (`.ckpt`, `.pt`, `.pth`,
        `.bin`), told apart by their contents whatever the file's name. PyTorch
        checkpoints are read with `torch.load(weights_only=True)` and need torch.
    - `config`: the full configuration, when it is known.
    - `preset`: the model family, one of `eqx_vae.PRESETS` (`"sd15"` for
        `sd-vae-ft-mse`/`-ema`, `"sdxl"`, `"sd3"`, `"flux1"` for FLUX's `ae.safetensors`,
        `"flux2"`, ...); the file's architecture must match it.
    - `dtype`: parameter dtype; float32 by default.
    - `check_finite`: refuse weights that contain NaN or infinity.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][].
    """
    if config is not None and preset is not None:
        raise ValueError("Pass `config` or `preset`, not both.")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown `preset={preset!r}`; choose one of {list(PRESETS)}.")
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    if _reads_as_torch(path):
        return _load(path, load_torch_file(path), config, preset, dtype, check_finite)
    with SafetensorsFile(path) as tensors:
        return _load(path, tensors, config, preset, dtype, check_finite)


def _reads_as_torch(path: pathlib.Path) -> bool:
    """Whether to read `path` with torch rather than as safetensors: by how the file
    starts, and by its suffix when it starts like neither (so that the reader its name
    promises says what is wrong with it)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if looks_like_safetensors(head, path.stat().st_size):
        return False
    return looks_like_torch_file(head) or path.suffix in PICKLE_SUFFIXES


def _load(
    path: pathlib.Path,
    tensors: Mapping[str, Any],
    config: AutoencoderKLConfig | Mapping[str, Any] | None,
    preset: str | None,
    dtype: DTypeLike | None,
    check_finite: bool,
) -> AutoencoderKL:
    ldm = _strip_prefix(tensors)
    if any(name.startswith("encoder.down_blocks.") for name in ldm):
        # The same weights under diffusers' names: rename them to the LDM ones.
        levels = len(
            {name.split(".")[2] for name in ldm if name.startswith("encoder.down_blocks.")}
        )
        ldm = {to_ldm_name(name, levels): value for name, value in ldm.items()}
    if not any(name.startswith(("encoder.", "decoder.")) for name in ldm):
        raise CheckpointError(
            f"{path} holds no autoencoder weights (no `encoder.*`/`decoder.*` keys, with or "
            f"without a prefix among {list(_PREFIXES)})."
        )
    if config is None:
        inferred = infer_config(ldm, path)
        if preset is None and inferred.patch_size is not None:
            config = inferred  # FLUX.2: the file holds its latent normalisation
        else:
            if preset is None:
                preset = _family(tensors)
            if preset is None:
                raise CheckpointError(_ambiguous_message(path, inferred))
            config = _preset_matching(path, preset, inferred)
    elif not isinstance(config, AutoencoderKLConfig):
        config = AutoencoderKLConfig.from_dict(config)
    names = ldm_names(config)
    state_dict: dict[str, Any] = {}
    for name, tensor in ldm.items():
        new = names.get(name, name)
        if new in state_dict:
            raise CheckpointError(
                f"{path} holds {new} twice, under its original and its diffusers name."
            )
        state_dict[new] = squeeze_attention(name, tensor)
    try:
        return from_diffusers_state_dict(
            state_dict, config, dtype=dtype, check_finite=check_finite
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path} (names given in diffusers form): {e}") from None


def _strip_prefix(tensors: Mapping[str, Any]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if any(name.startswith(prefix + "encoder.") for name in tensors):
            return {
                name.removeprefix(prefix): value
                for name, value in tensors.items()
                if name.startswith(prefix)
                and not name.startswith(tuple(prefix + i for i in _IGNORED))
            }
    return {name: value for name, value in tensors.items() if not name.startswith(_IGNORED)}


def _family(tensors: Mapping[str, Any]) -> str | None:
    for marker, preset in _FAMILY_MARKERS:
        if any(marker in name for name in tensors):
            return preset
    return None


def _ambiguous_message(path: pathlib.Path, inferred: AutoencoderKLConfig) -> str:
    candidates = [
        p
        for p in PRESETS
        if getattr(AutoencoderKLConfig, p)().latent_channels == inferred.latent_channels
    ]
    return (
        f"{path} holds only an autoencoder with {inferred.latent_channels} latent channels, "
        "and the latent scaling of a VAE cannot be read off its weights. Pass "
        f"`preset=` (for this file one of {candidates or list(PRESETS)}; all presets: "
        f"{list(PRESETS)}) or a full `config=` (on the command line `--preset` or "
        "`--config config.json`)."
    )


_ARCHITECTURE_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "decoder_block_out_channels",
    "layers_per_block",
    "latent_channels",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "patch_size",
)


def _preset_matching(
    path: pathlib.Path, preset: str, inferred: AutoencoderKLConfig
) -> AutoencoderKLConfig:
    config = getattr(AutoencoderKLConfig, preset)()
    differences = [
        f"{name}: file {getattr(inferred, name)!r}, preset {getattr(config, name)!r}"
        for name in _ARCHITECTURE_FIELDS
        if getattr(inferred, name) != getattr(config, name)
    ]
    if differences:
        raise CheckpointError(
            f"{path} does not have the {preset!r} architecture ({'; '.join(differences)}). "
            "Pass a full `config=` (on the command line `--config config.json`) for a custom "
            "architecture."
        )
    return config


def infer_config(
    ldm: Mapping[str, Any], path: pathlib.Path | str = "the checkpoint"
) -> AutoencoderKLConfig:
    """The architecture of an LDM-named autoencoder state dict, read off its shapes,
    with SD 1.x's latent scaling (which the weights cannot tell), or for a file with
    FLUX.2's BatchNorm statistics the FLUX.2 preset's other values."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in ldm:
            raise CheckpointError(f"Cannot infer the architecture of {path}: it has no {name!r}.")
        return tuple(int(d) for d in ldm[name].shape)

    levels = _count_levels(path, ldm)
    blocks = {
        int(m.group(1))
        for name in ldm
        if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", name))
    }
    channels = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels))
    decoder = tuple(shape(f"decoder.up.{i}.block.0.conv2.weight")[0] for i in range(levels))
    moments = shape("encoder.conv_out.weight")[0]
    latent_channels = moments // 2
    groups = _DEFAULT_GROUPS
    if any(c % groups for c in channels + decoder):
        raise CheckpointError(
            f"{path} has level widths {channels} (decoder {decoder}), which {groups} "
            "GroupNorm groups (the number every published model uses, and which checkpoints "
            "do not store) do not divide; pass a full `config=` (on the command line "
            "`--config config.json`)."
        )
    family: dict[str, Any] = {}
    if "bn.running_mean" in ldm:
        # Published FLUX.2 models fold 2x2 patches: the only shape the BatchNorm's
        # channel count is checked against.
        bn_channels = shape("bn.running_mean")[0]
        if bn_channels != 4 * latent_channels:
            raise CheckpointError(
                f"{path} has a latent BatchNorm over {bn_channels} channels; FLUX.2's "
                f"2x2 patches of a {latent_channels}-channel latent have "
                f"{4 * latent_channels}. Pass a full `config=` with its `patch_size`."
            )
        flux2 = AutoencoderKLConfig.flux2()
        family = dict(patch_size=flux2.patch_size, sample_size=flux2.sample_size)
    try:
        return AutoencoderKLConfig(
            in_channels=shape("encoder.conv_in.weight")[1],
            out_channels=shape("decoder.conv_out.weight")[0],
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=channels,
            decoder_block_out_channels=None if decoder == channels else decoder,
            layers_per_block=len(blocks),
            latent_channels=latent_channels,
            norm_num_groups=groups,
            use_quant_conv=any(
                n in ldm for n in ("quant_conv.weight", "encoder.quant_conv.weight")
            ),
            use_post_quant_conv=any(
                n in ldm for n in ("post_quant_conv.weight", "decoder.post_quant_conv.weight")
            ),
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm,
            **family,
        )
    except ValueError as e:
        raise CheckpointError(f"Cannot infer the architecture of {path}: {e}") from e


def _count_levels(path: pathlib.Path | str, ldm: Mapping[str, Any]) -> int:
    levels = {int(m.group(1)) for name in ldm if (m := re.match(r"encoder\.down\.(\d+)\.", name))}
    if not levels or levels != set(range(len(levels))):
        raise CheckpointError(
            f"{path} has encoder levels {sorted(levels)}; expected 0, 1, ... (LDM names "
            "`encoder.down.<i>.block.<j>`)."
        )
    return len(levels)


@path_first
def save_single_file(
    path: str | os.PathLike[str], model: AutoencoderKL, *, dtype: DTypeLike | None = None
) -> None:
    """Writes `model` as a VAE-only single file with the original LDM names (attention
    projections as `(C, C, 1, 1)` convolutions), like `sd-vae-ft-mse`'s or FLUX's
    `ae.safetensors`; for FLUX.2 in the layout of its original `ae.safetensors`
    (`encoder.quant_conv`, `decoder.post_quant_conv`, and `bn.running_mean`,
    `bn.running_var`, `bn.num_batches_tracked`). Written to a temporary name first,
    then renamed.

    **Arguments:**

    - `path`: the `.safetensors` file to write.
    - `model`: an [`eqx_vae.AutoencoderKL`][].
    - `dtype`: the dtype to store the floating-point arrays in; by default the model's.

    The path comes first, as in [`eqx_vae.save`][]; the model-first order of earlier
    versions, `save_single_file(model, path)`, still works for one release with a
    `DeprecationWarning`.
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"`model` must be an AutoencoderKL, got {type(model).__name__}.")
    levels = len(model.config.block_out_channels)
    inner = inner_quant_convs(model.config)
    tensors = {}
    for name, value in to_diffusers_state_dict(model).items():
        ldm = to_ldm_name(name, levels, inner_quant_convs=inner)
        if ATTENTION_CONV.fullmatch(ldm):
            value = value.reshape(*value.shape, 1, 1)
        if dtype is not None and not np.issubdtype(value.dtype, np.integer):
            value = value.astype(np.dtype(jnp.dtype(dtype)))
        tensors[ldm] = value
    write_safetensors(path, tensors, metadata={"format": "pt"})
