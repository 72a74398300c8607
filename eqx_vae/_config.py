import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ._validation import (
    finite_float,
    int_tuple,
    positive_float,
    positive_int,
    sample_size,
)


_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_CLASS_NAME = "AutoencoderKL"
# diffusers' Flax model writes its own class name into the same config.
_FLAX_CLASS_NAME = "FlaxAutoencoderKL"
_FLUX2_CLASS_NAME = "AutoencoderKLFlux2"

# Keys that diffusers writes into `config.json` for its own bookkeeping. They carry no
# architectural information, so they are accepted and dropped.
_BOOKKEEPING_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash"}
)

_SD_CHANNELS = (128, 256, 512, 512)

# The fields of diffusers' `AutoencoderKLFlux2`, in its signature's order, with the
# defaults it fills in for keys a `config.json` leaves out.
_FLUX2_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (_DOWN_BLOCK,) * 4,
    "up_block_types": (_UP_BLOCK,) * 4,
    "block_out_channels": _SD_CHANNELS,
    "decoder_block_out_channels": None,
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": (2, 2),
}
# Fields of FLUX.2's latent BatchNorm, which diffusers' `AutoencoderKL` does not have.
_BATCH_NORM_FIELDS = ("batch_norm_eps", "batch_norm_momentum", "patch_size")
# The latent convention of the other families; FLUX.2's is its BatchNorm statistics.
_SCALING_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The hyperparameters of an [`eqx_vae.AutoencoderKL`][], with exactly the field
    names of diffusers' `AutoencoderKL` and `AutoencoderKLFlux2` `config.json`, and
    `AutoencoderKL`'s defaults.

    One config describes both families. `patch_size` says which: `None` (the default)
    is diffusers' `AutoencoderKL` (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1), whose
    latent convention is `scaling_factor`/`shift_factor`/`latents_mean`/`latents_std`;
    a patch size is diffusers' `AutoencoderKLFlux2` (FLUX.2), whose model carries the
    running statistics of a BatchNorm over the patchified latent, and whose latent
    convention they are (see [`eqx_vae.AutoencoderKL.scale_latents`][]).
    `class_name` names the family as diffusers does.

    The instance is frozen and hashable, so a model can carry it as a static field.

    **Fields:**

    - `in_channels`: channels of the images that are encoded.
    - `out_channels`: channels of the images that are decoded.
    - `down_block_types`: one `"DownEncoderBlock2D"` per level.
    - `up_block_types`: one `"UpDecoderBlock2D"` per level.
    - `block_out_channels`: the width of each level, from the image side.
    - `layers_per_block`: ResNet blocks per encoder level (the decoder has one more).
    - `act_fn`: only `"silu"` is used by any published model and supported here.
    - `latent_channels`: channels of the latent.
    - `norm_num_groups`: GroupNorm groups; must divide every entry of
        `block_out_channels` and `decoder_block_out_channels`.
    - `sample_size`: the training resolution (informative only).
    - `scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`: the latent
        convention of the `AutoencoderKL` family, applied by
        [`eqx_vae.AutoencoderKL.scale_latents`][]. They do not apply to FLUX.2 (whose
        latent convention is its BatchNorm statistics) and stay at their defaults there.
    - `force_upcast`: whether the published pipelines run this VAE in float32 even when
        the diffusion model runs in half precision: a `float16` request computes in
        float32. diffusers' `AutoencoderKLFlux2` has no such field, but FLUX.2's
        published `config.json` carries `force_upcast: true`; eqx_vae honours it for
        both families (and writes it for FLUX.2 only when it is `False`).
    - `use_quant_conv`, `use_post_quant_conv`: whether the 1x1 convolutions around the
        latent exist.
    - `mid_block_add_attention`: whether the mid blocks have self-attention.
    - `decoder_block_out_channels`: the width of each decoder level, from the image
        side, when the decoder is narrower (or wider) than the encoder; `None` for the
        encoder's widths. As many levels as `block_out_channels`. Any family may have
        one, but diffusers' `AutoencoderKL` cannot, so only FLUX.2 configs with one can
        be written as diffusers folders.
    - `patch_size`: `None`, or the `(height, width)` of the patches that FLUX.2's
        latent is folded into before its BatchNorm (`(2, 2)` in diffusers and in every
        published model): the family flag.
    - `batch_norm_eps`: the epsilon of FLUX.2's latent BatchNorm (only with
        `patch_size`).
    - `batch_norm_momentum`: the momentum diffusers' BatchNorm would update its
        statistics with (only with `patch_size`). Kept for diffusers' `config.json`;
        eqx_vae never updates the statistics.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    decoder_block_out_channels: tuple[int, ...] | None = None
    patch_size: tuple[int, int] | None = None
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1

    def __post_init__(self):
        self._check_types()
        self._check_architecture()
        self._check_latent_convention()
        self._check_batch_norm()

    def _put(self, name: str, value: Any) -> None:
        """Normalises a field of the frozen instance (lists to tuples, ints to floats)."""
        object.__setattr__(self, name, value)

    def _check_types(self) -> None:
        put = self._put
        for name in ("down_block_types", "up_block_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"`{name}` must be a sequence of strings, got {value!r}.")
            put(name, tuple(value))
        put("block_out_channels", int_tuple("block_out_channels", self.block_out_channels))
        if self.decoder_block_out_channels is not None:
            put(
                "decoder_block_out_channels",
                int_tuple("decoder_block_out_channels", self.decoder_block_out_channels),
            )
        if self.patch_size is not None:
            patch = int_tuple("patch_size", self.patch_size)
            if len(patch) != 2:
                raise ValueError(
                    f"`patch_size` must be None or (height, width), got {self.patch_size!r}."
                )
            put("patch_size", patch)
        for name in (
            "in_channels",
            "out_channels",
            "layers_per_block",
            "latent_channels",
            "norm_num_groups",
        ):
            positive_int(name, getattr(self, name))
        put("sample_size", sample_size(self.sample_size))
        for name in (
            "force_upcast",
            "use_quant_conv",
            "use_post_quant_conv",
            "mid_block_add_attention",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")

    def _check_architecture(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("`block_out_channels` must name at least one level, got ().")
        for name, allowed in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            value = getattr(self, name)
            unsupported = [t for t in value if t != allowed]
            if unsupported:
                raise ValueError(
                    f"`{name}` contains {unsupported[0]!r}; only {allowed!r} is supported "
                    "(the KL autoencoder of the Stable Diffusion family)."
                )
            if len(value) != levels:
                raise ValueError(
                    f"`{name}` has {len(value)} entries but `block_out_channels` has "
                    f"{levels} levels; pass `{name}=({allowed!r},) * {levels}`."
                )
        if self.act_fn != "silu":
            raise ValueError(f"`act_fn` must be 'silu', got {self.act_fn!r}.")
        decoder = self.decoder_block_out_channels
        if decoder is not None and len(decoder) != levels:
            raise ValueError(
                f"`decoder_block_out_channels={decoder}` has {len(decoder)} levels but "
                f"`block_out_channels` has {levels}; the decoder must undo the encoder's "
                f"{levels - 1} downsamplings, so give one width per level."
            )
        for name in ("block_out_channels", "decoder_block_out_channels"):
            for channels in getattr(self, name) or ():
                if channels % self.norm_num_groups != 0:
                    raise ValueError(
                        f"`norm_num_groups={self.norm_num_groups}` does not divide the "
                        f"channel count {channels} in `{name}={getattr(self, name)}`; "
                        "choose a number of groups that divides every level's width."
                    )

    def _check_latent_convention(self) -> None:
        put = self._put
        put("scaling_factor", positive_float("scaling_factor", self.scaling_factor))
        if self.shift_factor is not None:
            put("shift_factor", finite_float("shift_factor", self.shift_factor))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError(
                "`latents_mean` and `latents_std` must be given together, got "
                f"latents_mean={self.latents_mean!r} and latents_std={self.latents_std!r}."
            )
        if self.latents_mean is not None and self.latents_std is not None:
            if self.shift_factor is not None:
                raise ValueError(
                    "`shift_factor` and `latents_mean`/`latents_std` are two different "
                    "latent conventions; set one of them, not both."
                )
            mean = tuple(finite_float("latents_mean", v) for v in self.latents_mean)
            std = tuple(positive_float("latents_std", v) for v in self.latents_std)
            for name, value in (("latents_mean", mean), ("latents_std", std)):
                if len(value) != self.latent_channels:
                    raise ValueError(
                        f"`{name}` has {len(value)} entries but `latent_channels` is "
                        f"{self.latent_channels}."
                    )
            put("latents_mean", mean)
            put("latents_std", std)

    def _check_batch_norm(self) -> None:
        put = self._put
        put("batch_norm_eps", positive_float("batch_norm_eps", self.batch_norm_eps))
        momentum = finite_float("batch_norm_momentum", self.batch_norm_momentum)
        if not 0 <= momentum <= 1:
            raise ValueError(f"`batch_norm_momentum` must lie in [0, 1], got {momentum!r}.")
        put("batch_norm_momentum", momentum)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.patch_size is None:
            changed = [n for n in _BATCH_NORM_FIELDS if getattr(self, n) != defaults[n]]
            if changed:
                raise ValueError(
                    f"`{changed[0]}={getattr(self, changed[0])!r}` belongs to FLUX.2's latent "
                    "BatchNorm, which only a config with a `patch_size` has; set "
                    "`patch_size=(2, 2)` for the FLUX.2 family, or leave it at its default."
                )
            return
        changed = [n for n in _SCALING_FIELDS if getattr(self, n) != defaults[n]]
        if changed:
            raise ValueError(
                f"`{changed[0]}={getattr(self, changed[0])!r}` does not apply to the FLUX.2 "
                f"family (`patch_size={self.patch_size}`): its latents are normalised by the "
                "model's BatchNorm statistics. Leave it at its default, or set "
                "`patch_size=None` for a scaled latent."
            )

    @property
    def spatial_factor(self) -> int:
        """How many image pixels one latent pixel spans along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The width of each decoder level, from the image side."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def class_name(self) -> str:
        """diffusers' class for this config: `"AutoencoderKLFlux2"` with a
        `patch_size`, otherwise `"AutoencoderKL"`."""
        return _CLASS_NAME if self.patch_size is None else _FLUX2_CLASS_NAME

    @property
    def latent_patch(self) -> tuple[int, int]:
        """The patch a scaled latent's pixel folds: `patch_size`, or `(1, 1)`."""
        return (1, 1) if self.patch_size is None else self.patch_size

    @property
    def scaled_latent_channels(self) -> int:
        """Channels of the latent a diffusion model sees (`scale_latents`'s output):
        `latent_channels` times the pixels of a patch."""
        return self.latent_channels * self.latent_patch[0] * self.latent_patch[1]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Builds a config from the contents of a diffusers `config.json`.

        **Arguments:**

        - `config`: the parsed JSON. Its `_class_name` picks the family:
            `"AutoencoderKL"` (also when absent, and `"FlaxAutoencoderKL"`, which has
            the same fields) or `"AutoencoderKLFlux2"`, whose
            missing keys take `AutoencoderKLFlux2`'s defaults (`latent_channels=32`,
            `patch_size=(2, 2)`, ...), as diffusers fills them in. Bookkeeping keys
            (`_diffusers_version`, `_name_or_path`, ...) are accepted; any other key
            that is not a field of that class raises, and so does an `AutoencoderKL`
            config with FLUX.2's BatchNorm fields, or a FLUX.2 config with a latent
            scaling (diffusers would ignore either).

        **Returns:**

        An `AutoencoderKLConfig`.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"Expected a mapping of config keys, got {type(config).__name__}.")
        class_name = config.get("_class_name", _CLASS_NAME)
        if class_name == _FLAX_CLASS_NAME:
            class_name = _CLASS_NAME
        if class_name not in (_CLASS_NAME, _FLUX2_CLASS_NAME):
            raise ValueError(
                f"This config describes a {class_name!r}; eqx_vae implements {_CLASS_NAME!r} "
                f"and {_FLUX2_CLASS_NAME!r}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        if class_name == _FLUX2_CLASS_NAME:
            known = set(_FLUX2_DEFAULTS) | {"force_upcast"}
            values = dict(_FLUX2_DEFAULTS)
        else:
            known = fields - set(_BATCH_NORM_FIELDS)
            values = {}
        unknown = sorted(k for k in config if k not in known and k not in _BOOKKEEPING_KEYS)
        if unknown:
            misplaced = [k for k in unknown if k in fields]
            if misplaced:
                raise ValueError(
                    f"{class_name} configs have no {misplaced}: "
                    + (
                        "the FLUX.2 family's latent convention is its BatchNorm statistics, "
                        "not a scaling; remove these keys."
                        if class_name == _FLUX2_CLASS_NAME
                        else f"they belong to FLUX.2's latent BatchNorm; set `_class_name` "
                        f"to {_FLUX2_CLASS_NAME!r} for that family."
                    )
                )
            raise ValueError(
                f"Unknown {class_name} config keys {unknown}; known keys are {sorted(known)}."
            )
        values.update({k: _tuples(v) for k, v in config.items() if k in known})
        if class_name == _FLUX2_CLASS_NAME and values["patch_size"] is None:
            raise ValueError(
                f"`patch_size` must be (height, width) in an {_FLUX2_CLASS_NAME} config, got None."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as diffusers writes it to `config.json` (lists, not tuples,
        and `_class_name`): the fields of `AutoencoderKL` (and
        `decoder_block_out_channels` when set), or for FLUX.2 those of
        `AutoencoderKLFlux2` (and `force_upcast` when it is `False`)."""
        out: dict[str, Any] = {"_class_name": self.class_name}
        if self.patch_size is None:
            names = [f.name for f in dataclasses.fields(self)]
            names = [n for n in names if n not in _BATCH_NORM_FIELDS]
            if self.decoder_block_out_channels is None:
                names.remove("decoder_block_out_channels")
        else:
            names = list(_FLUX2_DEFAULTS) + ([] if self.force_upcast else ["force_upcast"])
        for name in names:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "AutoencoderKLConfig":
        """Returns a copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)

    # Presets: the published configurations of the Stable Diffusion family.

    @classmethod
    def sd15(cls) -> "AutoencoderKLConfig":
        """Stable Diffusion 1.x (and `sd-vae-ft-mse`/`sd-vae-ft-ema`)."""
        return cls(**_sd_architecture(4), sample_size=512, scaling_factor=0.18215)

    @classmethod
    def sd2(cls) -> "AutoencoderKLConfig":
        """Stable Diffusion 2.x (768 px v-prediction models; same VAE as 1.x)."""
        return cls(**_sd_architecture(4), sample_size=768, scaling_factor=0.18215)

    @classmethod
    def sdxl(cls) -> "AutoencoderKLConfig":
        """Stable Diffusion XL. The original weights overflow in float16."""
        return cls(**_sd_architecture(4), sample_size=1024, scaling_factor=0.13025)

    @classmethod
    def sd3(cls) -> "AutoencoderKLConfig":
        """Stable Diffusion 3 and 3.5: 16 latent channels, no quant convs."""
        return cls(**_sixteen_channels(), scaling_factor=1.5305, shift_factor=0.0609)

    @classmethod
    def flux1(cls) -> "AutoencoderKLConfig":
        """FLUX.1 (dev, schnell and derivatives): 16 latent channels, no quant convs."""
        return cls(**_sixteen_channels(), scaling_factor=0.3611, shift_factor=0.1159)

    @classmethod
    def playground25(cls) -> "AutoencoderKLConfig":
        """Playground v2.5: the SDXL architecture with per-channel latent statistics."""
        return cls(
            **_sd_architecture(4),
            sample_size=1024,
            scaling_factor=0.5,
            latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
            latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
        )

    @classmethod
    def flux2(cls) -> "AutoencoderKLConfig":
        """FLUX.2 (dev and klein share it): 32 latent channels, quant convs, and a
        BatchNorm over the 2x2-patchified latent (eps `1e-4`) whose running statistics
        normalise what the transformer sees: 128 channels at a sixteenth of the image's
        height and width."""
        return cls(**_sd_architecture(32), sample_size=1024, patch_size=(2, 2))


PRESETS = ("sd15", "sd2", "sdxl", "sd3", "flux1", "playground25", "flux2")


def _sd_architecture(latent_channels: int) -> dict[str, Any]:
    levels = len(_SD_CHANNELS)
    return dict(
        down_block_types=(_DOWN_BLOCK,) * levels,
        up_block_types=(_UP_BLOCK,) * levels,
        block_out_channels=_SD_CHANNELS,
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=32,
    )


def _sixteen_channels() -> dict[str, Any]:
    """SD3's and FLUX.1's: the SD architecture with a 16-channel latent and no quant
    convs, trained at 1024 pixels."""
    return dict(
        **_sd_architecture(16), sample_size=1024, use_quant_conv=False, use_post_quant_conv=False
    )


def _tuples(value: Any) -> Any:
    """JSON gives lists where the config holds tuples."""
    return tuple(value) if isinstance(value, list) else value
