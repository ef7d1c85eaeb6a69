"""sd-parity's from-scratch Stable Diffusion 1.x (pure torch; no diffusers or transformers models)."""
from .config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig, preset, sd15, tiny

__all__ = ["CLIPTextConfig", "SDConfig", "UNetConfig", "VAEConfig", "preset", "sd15", "tiny"]
