"""The configs shipped in ``d3sr_core/models/configs``: each file is the one its base and part
name, read without its ``_class_name``; an unknown
base or part is a KeyError that lists the known bases."""

import json
from pathlib import Path

import diffusers
import pytest

from d3sr_core.models.configs import BUNDLED, bundled_config

CONFIGS = Path(__file__).resolve().parent.parent / "d3sr_core" / "models" / "configs"

# (base, part) -> the class in the file and facts of that base (its model card)
EXPECTED = {
    ("sd21-base", "unet"): ("UNet2DConditionModel", {"cross_attention_dim": 1024}),
    ("sd21-base", "vae"): ("AutoencoderKL", {"scaling_factor": 0.18215, "latent_channels": 4}),
    ("sd21-base", "scheduler"): ("PNDMScheduler", {"prediction_type": "epsilon"}),
    ("sdxl-base", "unet"): ("UNet2DConditionModel", {"cross_attention_dim": 2048}),
    ("sdxl-base", "scheduler"): ("EulerDiscreteScheduler", {"prediction_type": "epsilon"}),
}


def test_every_bundled_config_is_its_file_without_the_class_name():
    assert {(b, p) for b, parts in BUNDLED.items() for p in parts} == set(EXPECTED)
    for (base, part), (cls_name, facts) in EXPECTED.items():
        config = bundled_config(base, part)
        data = (CONFIGS / BUNDLED[base][part]).read_bytes()
        assert data.isascii()  # the same text in any locale's encoding
        raw = json.loads(data)
        assert raw.pop("_class_name") == cls_name
        assert config == raw and "_class_name" not in config
        assert {k: config[k] for k in facts} == facts
        if part == "scheduler":  # (the models are built from them in test_lora, test_single_file)
            scheduler = getattr(diffusers, cls_name).from_config(config)
            assert scheduler.config.prediction_type == "epsilon"
    # a fresh dict each call: callers may change it
    bundled_config("sd21-base", "vae")["scaling_factor"] = 1.0
    assert bundled_config("sd21-base", "vae")["scaling_factor"] == 0.18215


@pytest.mark.parametrize("base, part", [("sd15", "unet"), ("sdxl-base", "vae")])
def test_unknown_base_or_part_is_a_key_error_naming_the_known_bases(base, part):
    with pytest.raises(KeyError) as err:
        bundled_config(base, part)
    assert err.value.args[0] == (
        f"no bundled {part!r} config for base {base!r}; known: ['sd21-base', 'sdxl-base']"
    )
    assert err.value.__suppress_context__
