"""PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`), read only through
`torch.load(weights_only=True)`, which refuses to run code stored in the file."""

import os
import pathlib
from typing import Any

from .._errors import CheckpointError


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def looks_like_torch_file(head: bytes) -> bool:
    """Whether a file that starts with `head` is a PyTorch checkpoint: a zip archive
    (`torch.save` since PyTorch 1.6) or a pickle of protocol 2 to 5 (the legacy
    format)."""
    return head.startswith(b"PK\x03\x04") or (
        len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    )


def load_torch_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of a PyTorch checkpoint, as a name -> tensor mapping.

    A Lightning-style `{"state_dict": {...}}` wrapper is unwrapped.
    """
    path = pathlib.Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle. eqx_vae reads pickles only with torch's safe "
            "loader: install torch (`pip install torch`), or convert the file to "
            "safetensors where torch is installed:\n"
            "    import torch, safetensors.torch\n"
            "    sd = torch.load(PATH, map_location='cpu', weights_only=True)\n"
            "    sd = sd.get('state_dict', sd)\n"
            "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() "
            "if isinstance(v, torch.Tensor)}, OUT)"
        ) from None
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe pickles
        raise CheckpointError(f"Cannot load {path} with torch.load(weights_only=True): {e}") from e
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict):
        contents = contents["state_dict"]
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path} holds a {type(contents).__name__}, not a state dict.")
    return {str(k): v for k, v in contents.items() if isinstance(v, torch.Tensor)}
