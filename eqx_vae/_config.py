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
_CLASS_NAMES = frozenset({_CLASS_NAME, "FlaxAutoencoderKL"})

# Keys that diffusers writes into `config.json` for its own bookkeeping. They carry no
# architectural information, so they are accepted and dropped.
_BOOKKEEPING_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash"}
)

_SD_CHANNELS = (128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The hyperparameters of an [`eqx_vae.AutoencoderKL`][], with exactly the field
    names and defaults of diffusers' `AutoencoderKL` `config.json`.

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
        `block_out_channels`.
    - `sample_size`: the training resolution (informative only).
    - `scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`: the latent
        convention, applied by [`eqx_vae.AutoencoderKL.scale_latents`][].
    - `force_upcast`: whether the published pipelines run this VAE in float32 even when
        the diffusion model runs in half precision.
    - `use_quant_conv`, `use_post_quant_conv`: whether the 1x1 convolutions around the
        latent exist.
    - `mid_block_add_attention`: whether the mid blocks have self-attention.
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

    def __post_init__(self):
        self._check_types()
        self._check_architecture()
        self._check_latent_convention()

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
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups != 0:
                raise ValueError(
                    f"`norm_num_groups={self.norm_num_groups}` does not divide the channel "
                    f"count {channels} in `block_out_channels={self.block_out_channels}`; "
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

    @property
    def spatial_factor(self) -> int:
        """How many image pixels one latent pixel spans along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Builds a config from the contents of a diffusers `config.json`.

        **Arguments:**

        - `config`: the parsed JSON (of an `AutoencoderKL` or a `FlaxAutoencoderKL`).
            Bookkeeping keys (`_class_name`, `_diffusers_version`, `_name_or_path`, ...)
            are accepted; any other key that is not a field raises.

        **Returns:**

        An `AutoencoderKLConfig`.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"Expected a mapping of config keys, got {type(config).__name__}.")
        class_name = config.get("_class_name", _CLASS_NAME)
        if class_name not in _CLASS_NAMES:
            raise ValueError(
                f"This config describes a {class_name!r}; eqx_vae implements {_CLASS_NAME!r}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and k not in _BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown AutoencoderKL config keys {unknown}; known keys are {sorted(fields)}."
            )
        return cls(**{k: _tuples(v) for k, v in config.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as diffusers writes it to `config.json` (lists, not tuples,
        and `_class_name`)."""
        out: dict[str, Any] = {"_class_name": _CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
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


PRESETS = ("sd15", "sd2", "sdxl", "sd3", "flux1", "playground25")


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
