"""Loading by Hugging Face Hub id or local path, the way diffusers' `from_pretrained`
does."""

import os
import pathlib

from .._autoencoder import AutoencoderKL
from .._custom_types import DTypeLike
from .._errors import CheckpointError
from ._diffusers import CONFIG_NAME, WEIGHTS_NAME, load_diffusers
from ._flax_msgpack import FLAX_WEIGHTS_NAME


def from_pretrained(
    repo_id_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = "vae",
    revision: str | None = None,
    variant: str | None = None,
    dtype: DTypeLike | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    check_finite: bool = False,
) -> AutoencoderKL:
    """Loads a diffusers `AutoencoderKL` from a local folder or a Hugging Face Hub
    repository.

    A local folder is read directly (see [`eqx_vae.load_diffusers`][]). Anything else
    is taken as a Hub repository id and fetched with `huggingface_hub` (the `hub`
    extra), which uses its cache and honours `HF_HUB_OFFLINE=1`; only the config and
    the safetensors weights are downloaded, or, for a repository without them,
    diffusers' Flax weights (`diffusion_flax_model.msgpack`).

    **Arguments:**

    - `repo_id_or_path`: `"stabilityai/sdxl-vae"`, `"black-forest-labs/FLUX.1-dev"`,
        or a local folder.
    - `subfolder`: where a pipeline repository keeps its VAE; ignored when the folder
        itself holds a `config.json` (VAE-only repositories).
    - `revision`: a branch, tag or commit of the Hub repository.
    - `variant`: load `diffusion_pytorch_model.<variant>.safetensors`, e.g. `"fp16"`.
    - `dtype`: parameter dtype; float32 by default.
    - `cache_dir`, `local_files_only`, `token`: passed to
        `huggingface_hub.snapshot_download`.
    - `check_finite`: refuse weights that contain NaN or infinity.

    **Returns:**

    An [`eqx_vae.AutoencoderKL`][].
    """
    path = pathlib.Path(repo_id_or_path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; use `eqx_vae.load_single_file` for single-file "
                "checkpoints and `eqx_vae.load` for eqx_vae checkpoints."
            )
        return load_diffusers(
            path, dtype=dtype, variant=variant, subfolder=subfolder, check_finite=check_finite
        )
    repo_id = str(repo_id_or_path)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder nor a Hub repository id "
            "('organisation/name')."
        )
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise CheckpointError(
            f"Loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
            "`pip install 'eqx_vae[hub]'` (or download the folder and pass its path)."
        ) from None
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    patterns = [
        CONFIG_NAME,
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{stem}-*.safetensors",
    ]
    prefixes = ["", f"{subfolder}/"] if subfolder else [""]

    def download(names: list[str]) -> pathlib.Path:
        try:
            return pathlib.Path(
                huggingface_hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=None if cache_dir is None else str(cache_dir),
                    local_files_only=local_files_only,
                    token=token,
                    allow_patterns=[prefix + name for prefix in prefixes for name in names],
                )
            )
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise CheckpointError(
                f"Cannot fetch {repo_id!r} from the Hugging Face Hub: {e}"
            ) from e

    snapshot = download(patterns)
    folders = [snapshot, *([snapshot / subfolder] if subfolder else [])]
    if variant is None and not any(any(f.glob(f"{stem}*.safetensors*")) for f in folders):
        # A repository of the Flax era may hold only Flax weights.
        snapshot = download([CONFIG_NAME, FLAX_WEIGHTS_NAME])
    return load_diffusers(
        snapshot, dtype=dtype, variant=variant, subfolder=subfolder, check_finite=check_finite
    )
