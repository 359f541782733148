"""Denoiser networks: EDM's preconditioned UNets (DDPM++ / ADM) with SFD-v's optional step condition."""
from sfd.networks.edm import (
    EDM_CONFIGS,
    STEP_KEY_PREFIX,
    DhariwalUNet,
    EDMPrecond,
    SongUNet,
    build_edm,
)

__all__ = ["EDM_CONFIGS", "STEP_KEY_PREFIX", "DhariwalUNet", "EDMPrecond", "SongUNet", "build_edm"]
