"""Training and fine-tuning KL autoencoders with the CompVis recipe (needs `optax`
and, for the data pipeline, Pillow: `pip install 'eqx_vae[train]'`)."""

from ._checkpoint import load_checkpoint as load_checkpoint, save_checkpoint as save_checkpoint
from ._data import (
    Alternating as Alternating,
    DataPosition as DataPosition,
    ImageFolder as ImageFolder,
    Mixture as Mixture,
    Samples as Samples,
)
from ._discriminator import PatchDiscriminator as PatchDiscriminator
from ._loop import fit as fit, plot_losses as plot_losses
from ._losses import (
    adaptive_weight as adaptive_weight,
    generator_loss as generator_loss,
    hinge_d_loss as hinge_d_loss,
    l1 as l1,
    l2 as l2,
    nll_with_learned_logvar as nll_with_learned_logvar,
    vanilla_d_loss as vanilla_d_loss,
)
from ._lpips import LPIPS as LPIPS
from ._recipe import (
    autoencoder_loss as autoencoder_loss,
    discriminator_loss as discriminator_loss,
    reconstruct as reconstruct,
    reconstruction_loss as reconstruction_loss,
)
from ._state import (
    TrainConfig as TrainConfig,
    TrainState as TrainState,
    init_state as init_state,
    make_optimizers as make_optimizers,
    trainable as trainable,
)
from ._step import (
    accumulate_gradients as accumulate_gradients,
    apply_optimizer as apply_optimizer,
    make_train_step as make_train_step,
    update_ema as update_ema,
)
from ._synthetic import DeadLeaves as DeadLeaves
