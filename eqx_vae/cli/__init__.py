"""The `eqx-vae` command line."""

from ._main import main as main
