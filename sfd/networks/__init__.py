"""Denoiser networks: EDM's preconditioned UNets (DDPM++ / ADM) with SFD-v's optional step condition."""
from sfd.networks.edm import (
    EDM_CONFIGS,
    DhariwalUNet,
    EDMPrecond,
    SongUNet,
    build_edm,
    is_step_key,
)

__all__ = ["EDM_CONFIGS", "DhariwalUNet", "EDMPrecond", "SongUNet", "build_edm", "is_step_key"]
