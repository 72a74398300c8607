"""The KL autoencoder of latent diffusion (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1,
FLUX.2) as Equinox modules."""

from . import metrics as metrics
from ._attention import AttentionBlock as AttentionBlock
from ._autoencoder import AutoencoderKL as AutoencoderKL
from ._batch_norm import LatentBatchNorm as LatentBatchNorm
from ._builtin import builtin_config as builtin_config, load_builtin as load_builtin
from ._config import PRESETS as PRESETS, AutoencoderKLConfig as AutoencoderKLConfig
from ._decoder import Decoder as Decoder
from ._distribution import DiagonalGaussian as DiagonalGaussian
from ._encoder import Encoder as Encoder
from ._errors import CheckpointError as CheckpointError
from ._export import export as export
from ._exported_reader import (
    ExportedModel as ExportedModel,
    ExportedProgram as ExportedProgram,
    IncompatibleArtefactError as IncompatibleArtefactError,
    load_exported as load_exported,
)
from ._flax_params import from_flax_params as from_flax_params, to_flax_params as to_flax_params
from ._levels import (
    DownEncoderBlock2D as DownEncoderBlock2D,
    UpDecoderBlock2D as UpDecoderBlock2D,
)
from ._mid_block import MidBlock2D as MidBlock2D
from ._policy import Policy as Policy
from ._resnet import ResnetBlock2D as ResnetBlock2D
from ._sampling import Downsample2D as Downsample2D, Upsample2D as Upsample2D
from ._serialisation import load as load, save as save
from ._serving import Codec as Codec, Compiled as Compiled, compile as compile
from ._sharding import sharded_decode as sharded_decode, sharded_encode as sharded_encode
from ._state_dict import (
    from_diffusers_state_dict as from_diffusers_state_dict,
    to_diffusers_state_dict as to_diffusers_state_dict,
)
from ._statistics import (
    LatentStatistics as LatentStatistics,
    apply_latent_statistics as apply_latent_statistics,
    latent_statistics as latent_statistics,
)
from ._tiling import tiled_decode as tiled_decode, tiled_encode as tiled_encode
from ._version import __version__ as __version__
from ._xla import compiler_options as compiler_options
from .interop import (
    from_pretrained as from_pretrained,
    load_diffusers as load_diffusers,
    load_single_file as load_single_file,
    save_diffusers as save_diffusers,
    save_single_file as save_single_file,
)
