"""Reading and writing published checkpoint formats: diffusers folders, original single
files, safetensors, and the Hugging Face Hub."""

from ._diffusers import load_diffusers as load_diffusers, save_diffusers as save_diffusers
from ._hub import from_pretrained as from_pretrained
from ._safetensors import (
    SafetensorsFile as SafetensorsFile,
    TensorRef as TensorRef,
    write_safetensors as write_safetensors,
)
from ._single_file import (
    load_single_file as load_single_file,
    save_single_file as save_single_file,
)
