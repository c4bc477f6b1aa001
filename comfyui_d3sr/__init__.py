"""D3SR nodes for ComfyUI (V3 schema): D3SR Model Loader, D3SR Upscale Image, D3SR Upscale Latent.

Importing this package is light: it registers nothing and loads no model; ComfyUI calls
:func:`comfy_entrypoint`, which registers ``models/d3sr`` and returns the extension.
``d3sr_core`` (torch, diffusers) is imported only when a node runs.
"""

from .nodes import D3SRExtension, comfy_entrypoint

__all__ = ["D3SRExtension", "comfy_entrypoint"]
