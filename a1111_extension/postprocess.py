"""The Extras script "D3SR": upscale with per-run options, and D3SR's parameters in the infotext.

The stock Extras API (``/sdapi/v1/extra-single-image``) cannot pass arguments to extension
scripts: it calls this one with every argument None. None therefore means "the default"
(the script disabled, options from Settings > Upscaling), never an error. Through the API,
D3SR is reached as ``upscaler_1``; this script then still records the parameters used.
"""

from __future__ import annotations

import random

# The module, not the class: scripts/d3sr.py (which the webui scans for script classes) must
# never hold the base class by name, or the webui registers it too and the Extras tab fails.
from modules import scripts_postprocessing

from d3sr_core.inference.color import COLOR_FIXES
from d3sr_core.inference.options import output_size

from . import host, models, settings, upscaler

DEFAULT_SCALE = 4.0


def weights_choices() -> list[str]:
    """Display names of the weights files (as in the upscaler lists)."""
    return [models.display_name(p) for p in models.list_weights(_folders())]


def _folders():
    return models.weights_folders(host.cmd_opt("d3sr_models_path"), host.models_path() / "D3SR")


def _weights_for(name: str | None):
    """The weights file for a display name; None -> the first one found."""
    found = models.list_weights(_folders())
    for path in found:
        if models.display_name(path) == name:
            return path
    if name:
        raise models.D3SRError(
            f"no D3SR weights named '{name}' in {', '.join(map(str, _folders()))}"
        )
    if not found:
        raise models.D3SRError(models.missing_weights_message(_folders()))
    return found[0]


class ScriptPostprocessingD3SR(scripts_postprocessing.ScriptPostprocessing):
    name = "D3SR"
    order = 1050  # after Upscale (1000): it sees Upscale's result and its upscaler's run

    def ui(self):
        import gradio as gr
        from modules.ui_components import InputAccordion

        defaults = settings.current()
        choices = weights_choices()
        with InputAccordion(False, label="D3SR", elem_id="extras_d3sr") as enable:
            with gr.Row():
                model = gr.Dropdown(
                    label="D3SR weights",
                    choices=choices,
                    value=choices[0] if choices else None,
                    elem_id="extras_d3sr_model",
                )
                scale = gr.Slider(
                    minimum=1.0,
                    maximum=8.0,
                    step=0.05,
                    value=DEFAULT_SCALE,
                    label="Scale by",
                    elem_id="extras_d3sr_scale",
                )
            with gr.Row():
                tile_size = gr.Slider(
                    minimum=0,
                    maximum=2048,
                    step=64,
                    value=defaults.tile_size,
                    label="Tile size (0 = automatic)",
                    elem_id="extras_d3sr_tile_size",
                )
                tile_overlap = gr.Slider(
                    minimum=0,
                    maximum=512,
                    step=8,
                    value=defaults.tile_overlap,
                    label="Tile overlap",
                    elem_id="extras_d3sr_tile_overlap",
                )
            with gr.Row():
                color_fix = gr.Radio(
                    choices=list(COLOR_FIXES),
                    value=defaults.color_fix,
                    label="Colour fix",
                    elem_id="extras_d3sr_color_fix",
                )
                precision = gr.Radio(
                    choices=list(settings.PRECISIONS),
                    value=defaults.precision,
                    label="Precision",
                    elem_id="extras_d3sr_precision",
                )
            with gr.Row():
                strength = gr.Slider(
                    minimum=0.0,
                    maximum=1.5,
                    step=0.05,
                    value=defaults.strength,
                    label="Strength",
                    elem_id="extras_d3sr_strength",
                )
                seed = gr.Number(
                    value=-1, precision=0, label="Seed (-1 = random)", elem_id="extras_d3sr_seed"
                )
        return {
            "enable": enable,
            "model": model,
            "scale": scale,
            "tile_size": tile_size,
            "tile_overlap": tile_overlap,
            "color_fix": color_fix,
            "strength": strength,
            "seed": seed,
            "precision": precision,
        }

    def process_firstpass(self, pp, **args):
        upscaler.last_run = None  # so process() reports only this image's D3SR upscale

    def process(
        self,
        pp,
        enable=None,
        model=None,
        scale=None,
        tile_size=None,
        tile_overlap=None,
        color_fix=None,
        strength=None,
        seed=None,
        precision=None,
        **_,
    ):
        if not enable:
            if upscaler.last_run:  # the Upscale step used a D3SR upscaler on this image
                pp.info.update(upscaler.last_run)
            return
        scale = DEFAULT_SCALE if scale is None else float(scale)
        if seed is None or int(seed) < 0:
            seed = random.randrange(2**31)
        params = settings.current(
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            color_fix=color_fix,
            strength=strength,
            seed=seed,
            precision=precision,
        )
        weights = _weights_for(model)
        image = pp.image
        size = output_size(image.width, image.height, scale)
        result = upscaler.upscale_image(image, weights, size, params)
        if result is image:  # interrupted: keep the input, say nothing was done
            return
        pp.image = result
        pp.info.update({**upscaler.last_run, "D3SR scale": scale})
