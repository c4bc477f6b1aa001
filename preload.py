"""Command-line options the webui adds before it parses its arguments (A1111 / Forge)."""

import os

from modules import paths


def preload(parser):
    parser.add_argument(
        "--d3sr-models-path",
        type=str,
        default=os.path.join(paths.models_path, "D3SR"),
        help="Folder with D3SR weights (*.safetensors, or OSEDiff's osediff.pkl); default models/D3SR.",
    )
