"""Small AutoencoderKL (and AutoencoderKLFlux2) configurations that between them
exercise every flag, the random weights used for them, and the diffusers reference
computation.

Shared by the live parity tests and by `make_fixtures.py`, which stores the
reference outputs so that parity is also checked where torch is not installed.
"""

import ast
import dataclasses
import importlib.util
import pathlib
import types
from typing import Any

import numpy as np


def _config(levels: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        **kwargs,
    }


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    image_shape: tuple[int, int, int]


CASES = (
    Case(
        "one_level_lpb1",
        _config(1, block_out_channels=[32], layers_per_block=1, norm_num_groups=8),
        (3, 12, 10),
    ),
    Case(
        "two_levels_lpb3_quant_only_no_attention",
        _config(
            2,
            in_channels=4,
            out_channels=2,
            block_out_channels=[16, 32],
            layers_per_block=3,
            norm_num_groups=4,
            latent_channels=16,
            use_quant_conv=True,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
        (4, 16, 22),
    ),
    Case(
        "three_levels_post_quant_only",
        _config(
            3,
            in_channels=1,
            out_channels=1,
            block_out_channels=[16, 32, 32],
            layers_per_block=2,
            norm_num_groups=8,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=True,
        ),
        (1, 24, 16),
    ),
    Case(
        "four_levels_no_quant",
        _config(
            4,
            block_out_channels=[8, 16, 32, 32],
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        (3, 32, 48),
    ),
    Case(
        "sd_shaped",
        _config(
            4,
            block_out_channels=[16, 32, 48, 48],
            layers_per_block=2,
            norm_num_groups=16,
            latent_channels=4,
            scaling_factor=0.13025,
        ),
        (3, 40, 24),
    ),
    Case(
        "flux_shaped_no_attention",
        _config(
            4,
            block_out_channels=[16, 16, 32, 32],
            layers_per_block=2,
            norm_num_groups=16,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
        (3, 16, 32),
    ),
    Case(
        "flux2_narrow_decoder",
        _config(
            3,
            _class_name="AutoencoderKLFlux2",
            block_out_channels=[16, 32, 32],
            decoder_block_out_channels=[8, 16, 16],
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=8,
        ),
        (3, 24, 40),
    ),
)


def is_flux2(case: Case) -> bool:
    return case.config.get("_class_name") == "AutoencoderKLFlux2"


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random weights for the given diffusers parameter shapes, scaled so that
    activations stay of order one, with non-trivial GroupNorm affine parameters.

    The values are representable in float16 (so fixtures can store them in half the
    space) and returned as float32; FLUX.2's BatchNorm gets statistics far from PyTorch's
    initial ones (a positive variance) and an int64 batch count."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        is_norm = "norm" in name.rsplit(".", 2)[-2]
        if name.endswith(".num_batches_tracked"):
            out[name] = np.array(int(rng.integers(1, 10**6)), np.int64).reshape(shape)
            continue
        if name.endswith(".running_var"):
            value = np.exp(rng.standard_normal(shape))
        elif name.endswith(".running_mean"):
            value = 0.5 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif is_norm:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[name] = value.astype(np.float16).astype(np.float32)
    return out


def inputs(case: Case, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image in [-1, 1] and a latent for `case`."""
    rng = np.random.default_rng(seed + 1)
    image = rng.uniform(-1.0, 1.0, size=case.image_shape).astype(np.float32)
    factor = 2 ** (len(case.config["block_out_channels"]) - 1)
    latent_shape = (
        case.config.get("latent_channels", 4),
        case.image_shape[1] // factor,
        case.image_shape[2] // factor,
    )
    latent = rng.standard_normal(latent_shape).astype(np.float32)
    return image, latent


def diffusers_model(config: dict[str, Any], seed: int):
    """A diffusers `AutoencoderKL` (or `AutoencoderKLFlux2`, as the config's `_class_name`
    says) with `random_state_dict` weights, in eval mode."""
    import diffusers
    import torch

    torch.manual_seed(0)
    cls = getattr(diffusers, config.get("_class_name", "AutoencoderKL"))
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = random_state_dict(shapes, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model


def torch_outputs(model, image: np.ndarray, latent: np.ndarray) -> dict[str, np.ndarray]:
    """A diffusers model's posterior, decode and round trip for one image and latent."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        x = torch.from_numpy(image)[None].to(dtype)
        posterior = model.encode(x).latent_dist  # pyright: ignore[reportAttributeAccessIssue]
        decoded = model.decode(torch.from_numpy(latent)[None].to(dtype)).sample  # pyright: ignore
        recon = model(x, sample_posterior=False).sample
    return {
        "mean": posterior.mean[0].float().numpy(),
        "logvar": posterior.logvar[0].float().numpy(),
        "kl": posterior.kl()[0].float().numpy(),
        "decoded": decoded[0].float().numpy(),
        "reconstruction": recon[0].float().numpy(),
    }


def flux2_pipeline_functions() -> dict[str, Any]:
    """diffusers' `Flux2Pipeline._encode_vae_image` (the posterior mode, patchified and
    normalised by the VAE's BatchNorm statistics), `_patchify_latents`,
    `_unpatchify_latents` and `retrieve_latents`, taken from the pipeline's source: the
    pipeline module itself imports transformers, which the parity tests do not need."""
    import torch

    spec = importlib.util.find_spec("diffusers")
    assert spec is not None and spec.origin is not None
    path = pathlib.Path(spec.origin).parent / "pipelines" / "flux2" / "pipeline_flux2.py"
    wanted = {"retrieve_latents", "_encode_vae_image", "_patchify_latents", "_unpatchify_latents"}
    functions = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []  # the staticmethods become plain functions
            functions.append(node)
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    assert wanted <= set(namespace), sorted(wanted - set(namespace))
    return {name: namespace[name] for name in wanted}


def flux2_pipeline_outputs(model, image: np.ndarray, scaled: np.ndarray) -> dict[str, np.ndarray]:
    """What `Flux2Pipeline` computes around the VAE: the normalised, patchified latent of
    an image (`_encode_vae_image`), and the raw latent of a normalised one (the lines of
    `Flux2Pipeline.__call__` before `vae.decode`: denormalise, `_unpatchify_latents`)."""
    import torch

    pipeline = flux2_pipeline_functions()
    fake = types.SimpleNamespace(vae=model, _patchify_latents=pipeline["_patchify_latents"])
    with torch.no_grad():
        encoded = pipeline["_encode_vae_image"](fake, torch.from_numpy(image)[None], None)
        latents = torch.from_numpy(scaled)[None]
        mean = model.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
        unscaled = pipeline["_unpatchify_latents"](latents * std + mean)
    return {"scaled": encoded[0].numpy(), "unscaled": unscaled[0].numpy()}


def diffusers_reference(case: Case, seed: int) -> dict[str, np.ndarray]:
    """Builds the diffusers model for `case` with the random weights, and returns the
    weights (prefixed `param/`, floating ones as float16), the inputs and diffusers'
    outputs (for FLUX.2 also the pipeline's latent normalisation: `scaled` of the image,
    `unscaled` of the input `scaled_latent`)."""
    model = diffusers_model(case.config, seed)
    image, latent = inputs(case, seed)
    out = {
        f"param/{k}": v.numpy() if not v.is_floating_point() else v.numpy().astype(np.float16)
        for k, v in model.state_dict().items()
    }
    out.update(image=image, latent=latent, **torch_outputs(model, image, latent))
    if is_flux2(case):
        rng = np.random.default_rng(seed + 2)
        c, h, w = latent.shape
        scaled_latent = rng.standard_normal((4 * c, h // 2, w // 2)).astype(np.float32)
        out.update(
            scaled_latent=scaled_latent,
            **flux2_pipeline_outputs(model, image, scaled_latent),
        )
    return out
