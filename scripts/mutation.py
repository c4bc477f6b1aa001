"""Mutation testing of the numeric core, one module at a time (developer tool, not CI).

mutmut (>= 3.8, ``pip install "mutmut>=3.8"``) takes its test selection from
``[tool.mutmut]`` in ``pyproject.toml``, one selection for the whole run. Running every
module against the union of the numeric tests costs minutes per mutant on 2 cores, so this
driver gives each module only the fast tests that exercise it (``MODULE_TESTS``): it copies
``d3sr_core/``, ``tests/`` and ``pyproject.toml`` into ``WORKDIR/<module>/``, rewrites that
copy's ``[tool.mutmut]`` (``only_mutate`` = the module, ``pytest_add_cli_args_test_selection``
= its tests), runs ``mutmut run`` there and prints generated / killed / survived / timeout /
no-tests counts and the score. Within the selection mutmut still runs, per mutated function,
only the tests that executed it. Mutants listed in ``EQUIVALENT`` (each with the reason it
cannot change behaviour) are left out of the score.

    OMP_NUM_THREADS=1 python scripts/mutation.py d3sr_core/models/schedule.py --max-children 1
    python scripts/mutation.py --list                       # modules and their tests
    cd WORKDIR/schedule && mutmut show NAME                 # a survivor's diff

The work directory keeps mutmut's cache: a second run only retests what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the fast tests that check its numbers (pytest arguments, "-k" allowed).
MODULE_TESTS: dict[str, list[str]] = {
    "d3sr_core/models/schedule.py": ["tests/test_schedule.py"],
    "d3sr_core/models/configs/__init__.py": ["tests/test_bundled_configs.py"],
    "d3sr_core/losses/gan.py": ["tests/test_gan.py"],
    "d3sr_core/inference/alpha.py": [
        "tests/test_alpha_and_cache.py",
        "-k",
        "fill_transparent or hidden_colour",
    ],
    "d3sr_core/losses/ea_dists.py": ["tests/test_dists.py", "-k", "ea_dists or sobel"],
    "d3sr_core/inference/color.py": ["tests/test_color.py"],
    "d3sr_core/loading/osediff.py": [
        "tests/test_strength.py",
        "tests/test_checkpoint.py",
        "tests/test_weights_fuzz.py",
    ],
    "d3sr_core/loading/checkpoint.py": [
        "tests/test_checkpoint.py",
        "tests/test_strength.py",
        "tests/test_weights_fuzz.py",
    ],
    "d3sr_core/models/generator.py": [
        "tests/test_generator.py",
        "tests/test_reference_pipeline.py::test_upscale_matches_reference",
        "tests/test_pipeline.py::test_deterministic_and_seeded_sampling",
        "tests/test_latent.py",
        "tests/test_checkpoint.py",
        "tests/test_strength.py",
    ],
    "d3sr_core/losses/dists.py": ["tests/test_dists_files.py", "tests/test_dists.py"],
    "d3sr_core/models/lora.py": [
        "tests/test_lora.py",
        "tests/test_strength.py",
        "tests/test_checkpoint.py",
    ],
    "d3sr_core/inference/latent.py": ["tests/test_latent.py"],
    "d3sr_core/inference/precision.py": [
        "tests/test_precision.py",
        "tests/test_budget_precision.py",
    ],
    "d3sr_core/inference/unet_attention.py": [
        "tests/test_unet_attention.py",
        "tests/test_pipeline_large.py",
        "-k",
        "unet_attention or attention_window",
    ],
    "d3sr_core/inference/unet_feed_forward.py": [
        "tests/test_unet_feed_forward.py",
        "tests/test_pipeline_stages.py",
        "-k",
        "chunk or feed_forward or modules_restored",
    ],
    "d3sr_core/inference/tiling.py": [
        "tests/test_tiling.py",
        "tests/test_latent.py",
        "tests/test_budget_precision.py",
    ],
    "d3sr_core/inference/memory.py": ["tests/test_memory.py", "tests/test_budget_precision.py"],
    "d3sr_core/models/discriminator/condition.py": [
        "tests/test_discriminator.py",
        "-k",
        "condition or logit_grid or noising or config",
    ],
    "d3sr_core/models/discriminator/model.py": [
        "tests/test_discriminator.py",
        "tests/test_discriminator_trunk.py",
    ],
    "d3sr_core/models/discriminator/trunk.py": [
        "tests/test_discriminator.py",
        "tests/test_discriminator_trunk.py",
    ],
    # tiled VAE: mutmut runs a mutant's covering tests fastest first, so the slow whole-decode
    # comparisons only run for mutants the quick ones miss.
    "d3sr_core/inference/tiled_vae/norm.py": [
        "tests/test_tiled_vae_programs.py",
        "tests/test_vae_attention.py",
        "tests/test_tiled_vae.py",
        "tests/test_tiled_vae_half.py",
    ],
    "d3sr_core/inference/tiled_vae/whole.py": [
        "tests/test_tiled_vae_numbers.py",
        "tests/test_tiled_vae_runner.py",
        "tests/test_tiled_vae_programs.py",
        "tests/test_tiled_vae.py",
        "tests/test_tiled_vae_half.py",
        "tests/test_budget_precision.py",
    ],
    "d3sr_core/inference/tiled_vae/program.py": [
        "tests/test_tiled_vae_programs.py",
        "tests/test_tiled_vae.py",
        "tests/test_tiled_vae_half.py",
    ],
    "d3sr_core/inference/tiled_vae/spill.py": ["tests/test_tiled_vae_spill.py"],
    "d3sr_core/inference/tiled_vae/planner.py": [
        "tests/test_tiled_vae_numbers.py",
        "tests/test_tiled_vae_runner.py",
        "tests/test_tiled_vae.py",
        "tests/test_tiled_vae_spill.py",
        "tests/test_budget_precision.py",
    ],
    **{
        f"d3sr_core/inference/tiled_vae/{name}.py": [
            "tests/test_tiled_vae_numbers.py",
            "tests/test_tiled_vae_runner.py",
            "tests/test_vae_attention.py",
            "tests/test_tiled_vae_programs.py",
            "tests/test_tiled_vae.py",
            "tests/test_tiled_vae_spill.py",
            "tests/test_tiled_vae_half.py",
            "tests/test_budget_precision.py",
        ]
        for name in ("__init__", "ops", "runner")
    },
    "d3sr_core/inference/tiled_vae/attention.py": [
        "tests/test_vae_attention.py",
        "tests/test_tiled_vae.py",
    ],
    "d3sr_core/inference/options.py": [
        "tests/test_pipeline_options.py",
        "tests/test_size_option.py",
        "tests/test_pipeline.py",
    ],
    "d3sr_core/inference/pipeline.py": [
        "tests/test_pipeline_options.py",
        "tests/test_pipeline_stages.py",
        "tests/test_pipeline_paths.py",
        "tests/test_reference_pipeline.py",
        "tests/test_pipeline.py",
        "tests/test_size_option.py",
        "tests/test_alpha_and_cache.py::test_hidden_colour_does_not_bleed_into_visible_pixels",
        "tests/test_tiling.py::test_pipeline_latent_tiling_matches_untiled",
        "tests/test_pipeline_large.py",
    ],
}

# mutant name -> why it cannot change behaviour (excluded from the score). "CPU-only" ones
# differ only when tensors live on an accelerator, which the test machines do not have.
_S = "d3sr_core.models.schedule.x_"
_G = "d3sr_core.losses.gan.x_"
_C = "d3sr_core.inference.color.x_"
_BANDS = (
    "band size only changes memory: banding is exact (test_wavelet_in_bands_equals_whole_image)"
)
_E = "d3sr_core.losses.ea_dists.x_"
_O = "d3sr_core.loading.osediff.x_osediff_to_checkpoint__mutmut_"
_A = "d3sr_core.inference.alpha.x_fill_transparent__mutmut_"
_ONE_SIDE = (
    "pooling a 1-pixel side by 2 with ceil_mode gives the same single row/column (the divisor "
    "counts only pixels inside)"
)
_DM = "d3sr_core.models.discriminator.model.x"
_DD = _DM + "ǁDiffusionDiscriminatorǁ"
_DT = "d3sr_core.models.discriminator.trunk.x_"
_P = "d3sr_core.inference.pipeline.x"
_PL = "d3sr_core.inference.tiled_vae.planner.x_"
_R = "d3sr_core.inference.tiled_vae.runner.x"
_ZIP = "zip's strict only checks lengths that agree by construction (one region / id per stack element, as many as its channels)"
EQUIVALENT: dict[str, str] = {
    **{
        _PL + name: _ZIP
        for name in (
            "_work_bytes__mutmut_10",
            "_work_bytes__mutmut_13",
            "_work_bytes__mutmut_14",
            "plan_checkpoints__mutmut_55",
            "plan_checkpoints__mutmut_58",
            "plan_checkpoints__mutmut_59",
        )
    },
    **{_R + f"__read_pieces__mutmut_{i}": _ZIP for i in (4, 7, 8)},
    **{
        _R + f"ǁTiledVAERunnerǁ_start_tile__mutmut_{i}": "performance only: the tile asks for "
        "regions it does not store (an element twice, the top without statistics); they are "
        "computed and dropped, the stored values are the same"
        for i in (6, 7, 10, 11)
    },
    _R + "ǁTiledVAERunnerǁ_passes__mutmut_15": "ids are only compared for equality: new "
    "ids counted from 2 instead of 1 still never equal the input's 0 or each other",
    _R + "ǁTiledVAERunnerǁ_passes__mutmut_98": "one byte less for a tile's work share: "
    "changes a tile side only if a working-set estimate lands exactly on the float limit",
    _R + "ǁTiledVAERunnerǁ_passes__mutmut_121": "a disk tuple with nothing on disk and "
    "nothing written adds no read-ahead and no write-behind in _probe: same as None",
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "a lower bound of 2 instead of 1 on a "
        "quantity that is at least 2: a state's pixels (in-place states are full-resolution, "
        ">= 64) or a row's bytes (>= one 2-byte element)"
        for i in (149, 168)
    },
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "the checkpoints that can be overwritten "
        "in place are a resnet's input pushed ([x, x], the only one-tensor states with a "
        "same-shaped successor): ck_ids[1] is ck_ids[0]"
        for i in (88, 208)
    },
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "CPU-only: a checkpoint / spill file "
        "without device or with device=None is on the CPU, like x"
        for i in (220, 242, 249)
    },
    **{_R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": _ZIP for i in (356, 360, 361)},
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "performance only: a checkpoint allocated "
        "without the weights' memory format holds the same values (slice assignment copies)"
        for i in (243, 250)
    },
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "the output and the attention input are "
        "never stored compact (_plan keeps them in the compute dtype): .to(None) is .to(dtype)"
        for i in (456, 475)
    },
    **{
        _R + f"ǁTiledVAERunnerǁ_passes__mutmut_{i}": "the attention runs at stack depth 1: "
        "ck_ids[:-1] and ck_ids[:-2] are both empty, so its output's id meets no other id"
        for i in (459, 460, 462, 465, 470)
    },
    _R + "ǁTiledVAERunnerǁ_passes__mutmut_396": "the band's tensor is cast on write: "
    "_write_band assigns it into the checkpoint, whose dtype wins (memory of one band only)",
    _R + "ǁTiledVAERunnerǁ_plan__mutmut_10": "plan_checkpoints reads disk only when spill is "
    "on, and _plan sets it whenever spill is on",
    **{_R + f"__disk_regions__mutmut_{i}": _ZIP for i in (4, 7, 8)},
    **{_R + f"ǁTiledVAERunnerǁ_probe__mutmut_{i}": _ZIP for i in (40, 43, 44)},
    **{
        _R + f"ǁTiledVAERunnerǁ_memory_format__mutmut_{i}": "a model is converted to one "
        "memory format as a whole, so any conv with a spatial kernel and several input "
        "channels gives the same layout; the layout changes speed only, never values"
        for i in (3, 4, 5, 7, 10)
    },
    **{
        _R + f"ǁTiledVAERunnerǁ_plan__mutmut_{i}": "plan_checkpoints reads disk only when "
        "spill is on; without spill (the only case that reaches the compact plan) the disk "
        "limit and a falsy spill of any spelling are unused"
        for i in (11, 73, 74, 82, 83)
    },
    _R + "ǁTiledVAERunnerǁ_plan__mutmut_18": 'float("INF") is float("inf"): Python reads '
    "infinity in any letter case",
    _R + "ǁTiledVAERunnerǁ_work_limit__mutmut_13": "every program has a sync point at its "
    "largest size (the encoder's first GroupNorm after the size-keeping conv_in, the "
    "decoder's output), whose probe is a tile's bytes (> 1): max(1, probe) == max(0, probe)",
    _R + "ǁTiledVAERunnerǁ_passes__mutmut_392": "memory only: keeping bands[-2:] holds the "
    "band written at the previous band start one band longer and writes the same tensors into "
    "the same rows again; every band is still first written when it was before",
    _R + "ǁTiledVAERunnerǁ_halo__mutmut_19": "in-place passes start at a GroupNorm (or the "
    "Push after an attention), which reads no halo: needs[1] has the rows of needs[0]",
    _PL + "plan_checkpoints__mutmut_10": "ids are only compared for equality: new ids counted "
    "from 2 instead of 1 still never equal the input's 0 or each other",
    _PL + "plan_checkpoints__mutmut_15": "every program starts with a conv (post_quant_conv / "
    "conv_in) that replaces the input's id before the first sync point: the input's id 1 "
    "instead of 0 meets no other id",
    _PL + "plan_checkpoints__mutmut_16": "ops[None:s] is ops[0:s]",
    **{
        _PL + f"plan_checkpoints__mutmut_{i}": "the attention runs at stack depth 1 in every "
        "program and, always kept, no checkpoint straddles it: the ids after it (any fresh "
        "value for its output, the elements below it) are only compared with ids after it"
        for i in (32, 33, 35, 38, 144)
    },
    _PL + "plan_checkpoints__mutmut_68": "costs are differences of prefix sums: a prefix "
    "starting at 1.0 cancels",
    _PL + "plan_checkpoints__mutmut_77": "_op_cost does not read c_in (convs use their "
    "module's in_channels)",
    **{
        _PL + f"plan_checkpoints__mutmut_{i}": "a type alias only used in annotations"
        for i in (92, 93)
    },
    **{
        f"d3sr_core.inference.tiled_vae.ops.x_upsample_conv__mutmut_{i}": "CPU-only: "
        "torch.empty without device / device=None is on the CPU"
        for i in (34, 41)
    },
    **{
        f"d3sr_core.inference.tiled_vae.ops.x_subpixel_weights__mutmut_{i}": "fold() treats "
        "every phase other than 0 as phase 1: (0, 2) folds like (0, 1)"
        for i in (38, 40)
    },
    **{
        "d3sr_core.inference.tiled_vae.ops.x"
        + name: "a larger end of the computed region: _crop slices from "
        "its origin, so the same view of the same values"
        for name in (
            *(f"ǁUpConvǁrun__mutmut_{i}" for i in (43, 44, 51, 52)),
            *(f"ǁUpsampleǁrun__mutmut_{i}" for i in (32, 36)),
        )
    },
    **{
        f"d3sr_core.inference.tiled_vae.ops.xǁConvǁrun__mutmut_{i}": "F.conv2d's default "
        "groups is 1"
        for i in (35, 56)
    },
    "d3sr_core.inference.tiled_vae.ops.xǁAttendǁ__post_init____mutmut_47": "Norm.act is "
    "only tested for truth: None is falsy like False",
    **{
        f"d3sr_core.inference.tiled_vae.ops.x__ids__mutmut_{i}": "ids are only compared for "
        "equality: counting new ids by two still gives ids never seen before"
        for i in (12, 18)
    },
    "d3sr_core.inference.tiled_vae.ops.x_dense__mutmut_1": "a tensor packed in one layout "
    "only: t.contiguous(memory_format=that layout) returns t itself",
    "d3sr_core.inference.tiled_vae.ops.x__spans__mutmut_20": "one more edge than the n spans "
    "read: the last is unused",
    "d3sr_core.inference.tiled_vae.ops.xǁUpsampleǁrun__mutmut_15": "F.interpolate's default "
    "mode is 'nearest'",
    "d3sr_core.inference.tiled_vae.ops.xǁUpConvǁ__init____mutmut_31": 'an empty cache of "" '
    'instead of None: ""[:3] never equals the key, so the first call computes the phases',
    **{
        "d3sr_core.inference.tiled_vae.norm.x_group_moments__mutmut_"
        + str(i): "one float32 affine tensor is enough for the "
        "mixed-precision kernel: the same float32 statistics (checked bit for bit, CPU)"
        for i in (15, 16)
    },
    "d3sr_core.inference.tiled_vae.norm.x_group_moments__mutmut_32": "H * H instead of H * W: equal for square tiles, else the "
    "kernel raises and the fallback computes the same float32 statistics from a copy",
    "d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_67": "scale.view(-1, 1, 1) broadcasts against [1, C, h, w] like "
    "scale.view(1, -1, 1, 1)",
    **{
        "d3sr_core.inference.tiled_vae.program.x_"
        + name: "diffusers' VAE encoder / decoder and ResnetBlock2D always set this "
        "attribute: the getattr default is never used"
        for name in (
            "_head__mutmut_7",
            "_resnet__mutmut_29",
            "_resnet__mutmut_40",
            "_resnet__mutmut_53",
            "_resnet__mutmut_80",
            "_resnet__mutmut_86",
            "_resnet__mutmut_89",
            "_resnet__mutmut_92",
        )
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_estimate_untiled_bytes__mutmut_" + str(i): _ZIP
        for i in (29, 32, 33)
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_estimate_untiled_bytes__mutmut_"
        + str(i): "float itemsizes are 1, 2, 4 or 8: "
        "4 if itemsize >= 4 / > 4 / >= 5 else itemsize give the same temp for each"
        for i in (46, 47)
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "the SD VAE programs have no dilated convs "
        "(diffusers' Encoder/Decoder build them with dilation 1, F.conv2d's default)"
        for i in (30, 45)
    },
    "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_124": "at a side equal to the window, attention_spans gives one "
    "global span: windowed and global attention are the same computation",
    **{
        "d3sr_core.inference.tiled_vae.whole.x_estimate_untiled_bytes__mutmut_"
        + str(i): "the largest adjacent pair of an SD "
        "VAE program is two 128-channel full-resolution states, never the last pair (the "
        "output has 3 / the latent 8 channels) nor (input, output)"
        for i in (37, 41)
    },
    "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_104": "dividing by an output_scale_factor of exactly 1.0 changes no value",
    "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_116": "F.interpolate's default mode is 'nearest'",
    "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_148": "unreachable: every op type the programs emit is handled above",
    **{
        f"d3sr_core.inference.tiled_vae.program.x__mid_block__mutmut_{i}": "diffusers' mid "
        "block holds one more resnet than attentions: the zip never sees unequal lengths"
        for i in (6, 9, 11)
    },
    **{
        "d3sr_core.inference.tiled_vae.program.x_"
        + name: "diffusers' ResnetBlock2D / Downsample2D / Upsample2D / VAE blocks always "
        "set this attribute (maybe to None): the getattr default is never used"
        for name in (
            "_resnet__mutmut_21",
            "_downsampler__mutmut_6",
            "_downsampler__mutmut_13",
            "_downsampler__mutmut_16",
            "_downsampler__mutmut_19",
            "_downsampler__mutmut_26",
            "_downsampler__mutmut_29",
            "_downsampler__mutmut_32",
            "_upsampler__mutmut_6",
            "_upsampler__mutmut_12",
            "_upsampler__mutmut_15",
            "_upsampler__mutmut_18",
            "_upsampler__mutmut_25",
            "_upsampler__mutmut_28",
            "_upsampler__mutmut_31",
            "_upsampler__mutmut_38",
            "_upsampler__mutmut_41",
            "_upsampler__mutmut_44",
            "_upsampler__mutmut_50",
            "_upsampler__mutmut_53",
            "_upsampler__mutmut_56",
            "_upsampler__mutmut_57",
            "encoder_program__mutmut_12",
            "encoder_program__mutmut_28",
            "decoder_program__mutmut_7",
            "decoder_program__mutmut_26",
        )
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "every Norm op the programs emit has act=True (resnets and heads)"
        for i in (84,)
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "SiLU out of place on a fresh GroupNorm output: same values"
        for i in (86, 88, 89)
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "every program holds a Conv op, so next()'s default is never used"
        for i in (3, 5)
    },
    "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_13": "the programs' pads are symmetric or (0, 1, 0, 1): `or` picks the same branch",
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "a symmetric pad through F.pad then padding 0 is the same zero-padded "
        "convolution as the conv's own padding"
        for i in (14, 15)
    },
    **{
        "d3sr_core.inference.tiled_vae.whole.x_run_whole__mutmut_"
        + str(i): "the budget only sets the query-row chunk; rows are independent, so "
        "the values are the same"
        for i in (145, 146, 147)
    },
    **{
        f"d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ{name}": "CPU-only: no device / "
        "device=None keeps the tensor on the CPU"
        for name in ("prepare__mutmut_2", "prepare__mutmut_4", "place__mutmut_2")
    },
    **{
        f"d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ{name}": "a signed-byte view of "
        "the same memory: write / readinto copy the same bytes"
        for name in ("write__mutmut_29", "read__mutmut_22")
    },
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ__init____mutmut_27": "a buffered "
    "file reads back the same bytes (seek flushes the buffer): one more memory copy only",
    **{
        f"d3sr_core.models.configs.x_bundled_config__mutmut_{i}": "the bundled files are ASCII "
        "(test_bundled_configs checks it): read alike in UTF-8 and any locale encoding"
        for i in (5, 7, 13)
    },
    "d3sr_core.models.configs.x_bundled_config__mutmut_6": "'r' is open()'s default mode",
    "d3sr_core.models.configs.x_bundled_config__mutmut_18": "every bundled file has a "
    "_class_name (test_bundled_configs checks it), so pop needs no default",
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁstore__mutmut_22": "[B, H, W, C, "
    "itemsize] instead of [B, H, W, C * itemsize] bytes: data[b, y : y + n] is the same run",
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ__init____mutmut_59": "getattr's "
    "default None is as falsy as 0 (no O_DIRECT: the page cache)",
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ_read_run__mutmut_35": "a longer "
    "direct read into the bounce buffer (clamped at its size, still whole blocks): the bytes "
    "taken from it are the same",
    "d3sr_core.inference.tiled_vae.spill.xǁSpillIOǁclose__mutmut_6": "wait=True is "
    "ThreadPoolExecutor.shutdown's default",
    "d3sr_core.inference.tiled_vae.spill.xǁSpillIOǁclose__mutmut_10": "a SpillIO is not used "
    "after close() (the runner makes one per run and closes it before its files)",
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ_write_run__mutmut_13": "a run with "
    "no whole block inside (a1 == a0): its two ends are written through the page cache one by "
    "one instead of at once, the same bytes at the same offsets",
    "d3sr_core.inference.tiled_vae.spill.xǁSpilledTensorǁ_write_run__mutmut_66": "the slice "
    "end past a1 is clamped to the run's end: the extra bytes are the run's own, already "
    "written there (rewritten through the page cache)",
    **{
        f"d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_{i}": "CPU-only: the "
        "statistics .to(device=None) / without device stay on the CPU"
        for i in (7, 9, 17, 19)
    },
    "d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_52": "batch_norm's momentum is "
    "unused with training=False",
    "d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_80": "shift.view(-1, 1, 1) "
    "broadcasts against [1, C, h, w] like shift.view(1, -1, 1, 1)",
    "d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_91": "torch.cat of one tensor is "
    "a copy of it: same values",
    **{
        f"d3sr_core.inference.tiled_vae.norm.x__apply_norm__mutmut_{i}": "SiLU out of place on "
        "a fresh tensor nobody else holds: same values, one more buffer"
        for i in (100, 102, 103)
    },
    **{
        f"d3sr_core.inference.tiled_vae.norm.x_group_moments__mutmut_{i}": "CPU-only: "
        "torch.ones without device is on the CPU"
        for i in (10, 12)
    },
    "d3sr_core.inference.tiled_vae.norm.x_group_moments__mutmut_7": "float32 tiles through the "
    "affine kernel give the same statistics; half tiles through an fp32 copy accumulate in "
    "float32 like the mixed kernel: only the copy's memory differs",
    "d3sr_core.inference.tiled_vae.norm.x_group_moments__mutmut_47": "only float32/float64 "
    "tiles reach this line (half ones are converted by the fallback above): x.float() is x",
    **{
        _DT + name: "CPU-only: no device / device=None keeps the tensors on the CPU"
        for name in (
            "load_trunk__mutmut_33",
            "load_trunk__mutmut_60",
            "assign_trunk_weights__mutmut_34",
            "assign_trunk_weights__mutmut_36",
        )
    },
    **{
        _DT + f"load_trunk__mutmut_{i}": "a trunk built on the CPU (random init) whose every "
        "tensor assign_trunk_weights then replaces: same result, only memory and time"
        for i in (16, 49)
    },
    **{
        _DT + f"assign_trunk_weights__mutmut_{i}": "only the shapes and dtypes of the expected "
        "tensors are read: keep_vars only decides Parameter or detached tensor"
        for i in (5, 6)
    },
    _DT + "assign_trunk_weights__mutmut_31": "get_submodule('') is the model itself",
    **{
        _DT + f"assign_trunk_weights__mutmut_{i}": "a UNet trunk holds only floating-point "
        "parameters, no buffers (checked for the four backbones)"
        for i in (39, 47)
    },
    **{
        _DT + f"trunk_forward__mutmut_{i}": "getattr default None is falsy like False"
        for i in (64, 85)
    },
    _DT + "trunk_forward__mutmut_70": "diffusers' DownBlock2D.forward takes **kwargs and ignores "
    "encoder_hidden_states (diffusers 0.42; the blocks without it have no attention)",
    _DT + "trunk_forward__mutmut_39": "text_embeds and time_embeds are 2-d [B, D]: torch.cat "
    "along dim +1 is along dim -1",
    _DT + "trunk_forward__mutmut_49": "UNet2DConditionModel always has time_embed_act (None "
    "unless configured)",
    _DT + "prune_up_path__mutmut_5": "every UNet2DConditionModel has the four up-path attributes "
    "(None once pruned)",
    **{
        _DT + f"build_trunk__mutmut_{i}": "to_empty('meta') and initialising meta tensors leave "
        "the same meta trunk: only time"
        for i in (15, 16)
    },
    **{
        _DT + f"build_trunk__mutmut_{i}": "in the trunks every module with reset_parameters owns "
        "parameters directly and every module owning parameters has reset_parameters (checked "
        "for sdxl/sd21 base and tiny)"
        for i in (19, 28, 29)
    },
    **{
        _DD + name: "CPU-only: no device / device=None / .to(None) keeps tensors on the CPU"
        for name in (
            "from_pretrained__mutmut_8",
            "from_pretrained__mutmut_13",
            "sample_timesteps__mutmut_1",
            "sample_timesteps__mutmut_2",
            "sample_timesteps__mutmut_3",
            "sample_timesteps__mutmut_4",
            "sample_timesteps__mutmut_9",
            "sample_timesteps__mutmut_14",
            "noise_latents__mutmut_11",
            "noise_latents__mutmut_15",
            "noise_latents__mutmut_24",
            "forward__mutmut_4",
            "forward__mutmut_11",
            "load_trainable__mutmut_33",
        )
    },
    **{
        _DD + f"from_pretrained__mutmut_{i}": "trunk read in float32 (or the file's dtype), "
        "then the final .to(dtype) rounds it once: the same values, only the load's peak differs"
        for i in (9, 14)
    },
    **{
        _DD + f"from_config__mutmut_{i}": "build_trunk initialises in float32 and casts; "
        "without its dtype the final .to(dtype) casts the same values (peft casts LoRA after init)"
        for i in (11, 14)
    },
    **{
        _DM + f"__schedule_for__mutmut_{i}": "the fallback alphas_cumprod() defaults (scaled "
        "linear 0.00085..0.012, 1000 steps) are exactly both bundled scheduler configs"
        for i in (2, 3, 6, 7)
    },
    _DD + "__init____mutmut_84": "_schedule_for(None) falls back to alphas_cumprod(), the same "
    "schedule as both bundled bases' scheduler configs",
    _DD + "__init____mutmut_6": "the loop below sets requires_grad of every trunk parameter",
    _DD + "__init____mutmut_27": "peft's LoraConfig default lora_dropout is 0.0",
    _DD + "__init____mutmut_28": "peft's LoraConfig default init_lora_weights is True",
    _DD + "noise_latents__mutmut_3": "multiplying by a rescale of exactly 1.0 changes no value",
    _DD + "logits__mutmut_16": "the None defaults are overwritten for SDXL trunks and unused by "
    "trunk_forward for trunks without the text_time add-embedding",
    _DD + "logits__mutmut_23": "trunk_forward casts the concatenated add-embedding input to the "
    "trunk's dtype: one rounding of each element either way",
    _DD + "load_trainable_state_dict__mutmut_33": "load_state_dict tests `if strict:`; None is "
    "falsy like False",
    **{
        _DD + f"_check_condition__mutmut_{i}": "text_embeds / time_ids are 2-d [1, D] "
        "(DiscriminatorCondition): shape[+1] is shape[-1]"
        for i in (38, 41)
    },
    "d3sr_core.inference.pipeline.x_pad_to_multiple__mutmut_2": "shape[+2:] of the documented "
    "4-d image is shape[-2:]",
    **{
        _P + name: why
        for names, why in (
            (
                ("_pil_to_tensor__mutmut_22", "_pil_to_tensor__mutmut_24"),
                'mode "F" is 32-bit float: np.asarray gives float32 with or without the dtype',
            ),
            (
                ("_pil_to_tensor__mutmut_30", "_pil_to_tensor__mutmut_31"),
                'an RGBA image then goes through convert("RGBA"): a copy of the same values',
            ),
            (
                (
                    "ǁ_Progressǁstage__mutmut_22",
                    "ǁD3SRPipelineǁencode__mutmut_54",
                    "ǁD3SRPipelineǁdecode__mutmut_58",
                ),
                "a fraction above 1 (clamped at 2, or tick(2.0)): the count is capped at the "
                "stage's end by the outer min()",
            ),
            (
                (
                    "ǁD3SRPipelineǁencode__mutmut_57",
                    "ǁD3SRPipelineǁdenoise__mutmut_112",
                    "ǁD3SRPipelineǁdecode__mutmut_61",
                ),
                "_retry does not read its run argument",
            ),
            (
                ("ǁD3SRPipelineǁdenoise__mutmut_16",),
                "max(1, overlap) // 8 == max(0, overlap) // 8 for every int",
            ),
            (
                ("ǁD3SRPipelineǁdenoise__mutmut_30",),
                "UNet tiles are multiples of 8 (validated, _shrink_tile keeps them so): "
                "tile / 8 is the same whole number, int()ed by plan_latent_tiles",
            ),
            (
                ("ǁD3SRPipelineǁdenoise__mutmut_43", "ǁD3SRPipelineǁdenoise__mutmut_52"),
                "CPU-only: _attention_cost() is None except on MPS "
                "(test_attention_score_matrix_is_counted_only_on_mps checks it there)",
            ),
            (
                ("ǁD3SRPipelineǁdenoise__mutmut_59", "ǁD3SRPipelineǁdenoise__mutmut_61"),
                "CPU-only: the batch of tiles on accelerators (the CPU's is 1, tested)",
            ),
            (
                (
                    "ǁD3SRPipelineǁ_latent_from_moments__mutmut_26",
                    "ǁD3SRPipelineǁ_latent_from_moments__mutmut_30",
                    "ǁD3SRPipelineǁ_reference__mutmut_10",
                ),
                "CPU-only: device=None / .to(None) is the CPU the tensors are on",
            ),
            (
                (
                    "ǁD3SRPipelineǁ_latent_from_moments__mutmut_27",
                    "ǁD3SRPipelineǁ_latent_from_moments__mutmut_31",
                ),
                "the mean is float32 (moments.float()), randn's default dtype",
            ),
            (
                ("ǁD3SRPipelineǁ_reference__mutmut_5", "ǁD3SRPipelineǁ_reference__mutmut_9"),
                "align_corners=None (or left out) is False for bicubic (PyTorch's default)",
            ),
            (
                tuple(f"ǁD3SRPipelineǁ_vae_plan__mutmut_{i}" for i in (44, 45, 46, 47)),
                'the "tiled" label is never compared: _own_vae tiles every mode but "whole"',
            ),
            (
                ("ǁD3SRPipelineǁdenoise__mutmut_83", "ǁD3SRPipelineǁdenoise__mutmut_84"),
                "tiles share one size (tile_grid) and the log line needs > 1 tile: "
                "tiles[1] has tiles[0]'s h and w",
            ),
        )
        for name in names
    },
    **{
        f"d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_{i}": "CPU-only: "
        "the keys buffer's device None / omitted is the CPU, like x"
        for i in (140, 147)
    },
    **{
        f"d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_{i}": "exactly 2 "
        "spans never happen (an axis longer than the window has > 4 query blocks), so the "
        "general path runs, which gives the same values for a single span"
        for i in (234, 236)
    },
    "d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_242": "query rows one "
    "at a time instead of in budget chunks: the same values, only more calls",
    "d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_83": "int() of the min "
    "of positive numbers floors the true division like //",
    "d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_90": "row_bytes is "
    "never below 2 (w * 6 * c * itemsize): max(row_bytes, 2) is max(row_bytes, 1)",
    **{
        f"d3sr_core.inference.tiled_vae.attention.x__run_attention__mutmut_{i}": "the first "
        "query block's keys start at 0 (clamped), so k1 + k0 is k1 - k0"
        for i in (53, 58)
    },
    **{
        f"d3sr_core.losses.dists.x_to_unit_range__mutmut_{i}": "the (0, 1) shortcut: the "
        "general (x - 0) / (1 - 0) gives the same bits"
        for i in (7, 8)
    },
    "d3sr_core.losses.dists.xǁVGG16Featuresǁforward__mutmut_2": "features[None:end] is "
    "features[0:end]",
    **{
        f"d3sr_core.losses.dists.xǁDISTSǁ{name}__mutmut_{i}": "a float32 buffer not cast to the "
        "input's float dtype: type promotion gives the same values"
        for name, i in (("features", 4), ("features", 5), ("distance", 73), ("distance", 74))
    },
    "d3sr_core.losses.dists.xǁDISTSǁdistance__mutmut_48": "target features without autograd "
    "also under no_grad: the same values (the VGG is batch-independent in eval)",
    "d3sr_core.losses.dists.xǁDISTSǁdistance__mutmut_59": "torch.cat's default dim is 0",
    "d3sr_core.losses.dists.x_l2_pool__mutmut_17": "kernel.shape[-3:] of the 2-d kernel is "
    "shape[-2:]",
    **{
        f"d3sr_core.losses.dists.xǁL2Poolǁforward__mutmut_{i}": "no kernel: l2_pool uses its "
        "default kernel, the same one as the buffer"
        for i in (2, 4)
    },
    "d3sr_core.models.generator.xǁD3SRGeneratorǁ__init____mutmut_16": "persistent=None is "
    "falsy like False",
    **{
        f"d3sr_core.losses.dists.xǁDISTSǁ__init____mutmut_{i}": "mean/std as [3, 1, 1] "
        "broadcast against [B, 3, H, W] like [1, 3, 1, 1]"
        for i in (14, 33)
    },
    **{
        f"d3sr_core.losses.dists.x_l2_pool_kernel__mutmut_{i}": "[0.5, 1, 0.5] outer / 16 is "
        "exact in float32 too"
        for i in (3, 5)
    },
    **{
        f"d3sr_core.losses.dists.x_l2_pool__mutmut_{i}": "CPU-only: the kernel's device "
        "None / omitted is the CPU"
        for i in (11, 13)
    },
    "d3sr_core.losses.dists.xǁL2Poolǁ__init____mutmut_2": "a None buffer makes l2_pool use "
    "its default kernel, the same one",
    "d3sr_core.losses.dists.xǁL2Poolǁ__init____mutmut_3": "persistent=None is falsy like False",
    **{
        f"d3sr_core.losses.dists.xǁVGG16Featuresǁ__init____mutmut_{i}": "in-place ReLU after a "
        "conv: the conv output is used nowhere else"
        for i in (17, 18)
    },
    **{
        f"d3sr_core.losses.dists.xǁDISTSǁload_vgg16__mutmut_{i}": "the state holds exactly the "
        "expected keys (checked before): strict or not loads the same"
        for i in (4, 6, 7)
    },
    **{
        f"d3sr_core.inference.memory.x_system_available_memory__mutmut_{i}": "/proc/meminfo is "
        "ASCII: 'ASCII' or the locale's UTF-8 read it the same"
        for i in (3, 5, 9)
    },
    "d3sr_core.inference.memory.x_cpu_budget_cap__mutmut_8": "no dtype has 3-byte elements: "
    "<= 3 and <= 2 select the same dtypes",
    **{
        f"d3sr_core.inference.memory.x_is_oom_error__mutmut_{i}": "torch.cuda.OutOfMemoryError "
        "is torch.OutOfMemoryError (torch >= 2.5): the second owner adds nothing"
        for i in (5, 9, 10, 11, 17)
    },
    **{
        f"d3sr_core.inference.memory.x_is_oom_error__mutmut_{i}": "'mps backend out of memory' "
        "contains 'out of memory', matched just before"
        for i in (31, 32)
    },
    "d3sr_core.inference.memory.x_run_with_oom_retry__mutmut_6": "the loop raises at tries == "
    "max_retries: an extra iteration is never reached",
    **{
        f"d3sr_core.inference.memory.x_run_with_oom_retry__mutmut_{i}": "the unreachable "
        "AssertionError's message"
        for i in (39, 40, 41)
    },
    **{
        f"d3sr_core.models.generator.xǁD3SRGeneratorǁ{name}__mutmut_{i}": "return_dict None / "
        "True / omitted: diffusers' output object indexed with [0] is the same tensor"
        for name, i in (
            ("predict", 32),
            ("predict", 36),
            ("predict", 38),
            ("decode", 5),
            ("decode", 7),
            ("decode", 10),
        )
    },  # fmt: skip
    **{
        f"d3sr_core.models.generator.xǁD3SRGeneratorǁ{name}__mutmut_{i}": "CPU-only: device "
        "None / omitted is the CPU"
        for name, i in (
            ("predict", 22),
            ("predict", 26),
            ("encode", 12),
            ("encode", 16),
            ("set_prompt_embeds", 61),
            ("set_prompt_embeds", 63),
        )
    },  # fmt: skip
    **{
        f"d3sr_core.models.generator.xǁD3SRGeneratorǁpredict__mutmut_{i}": "torch.full with an "
        "int fill is int64 (torch.long) without a dtype"
        for i in (23, 27)
    },
    **{
        f"d3sr_core.inference.precision.x_{name}__mutmut_{i}": "CPU-only: the device given / "
        "dropped is the CPU the model is on"
        for name, i in (
            ("_cast", 8),
            ("_cast", 10),
            ("_cast", 13),
            ("_cast", 16),
            ("prepare_generator", 39),
            ("prepare_generator", 45),
            ("prepare_generator", 50),
        )
    },
    **{
        f"d3sr_core.inference.precision.x_{name}__mutmut_{i}": "'AUTO' is lower-cased by "
        "resolve_dtype / resolve_device"
        for name, i in (("prepare_generator", 2), ("prepare_generator", 37), ("resolve_device", 2))
    },
    **{
        f"d3sr_core.inference.precision.x_resolve_device__mutmut_{i}": "the cuda entry of the "
        "allowed types is never reached: cuda is handled by the branch above"
        for i in (49, 50)
    },
    "d3sr_core.inference.precision.x__mps_available__mutmut_6": "torch.backends always has "
    "mps (torch >= 1.12; a deleted attribute is re-imported lazily)",
    **{
        f"d3sr_core.inference.precision.x__cpu_flags__mutmut_{i}": "the key is the part before "
        "the first ':' whatever the split limit"
        for i in (18, 21)
    },
    **{
        f"d3sr_core.inference.precision.x__cpu_flags__mutmut_{i}": "differs only for a "
        "cpuinfo line with a second ':'; flag lists hold none"
        for i in (19, 32, 33, 35)
    },
    **{
        f"d3sr_core.inference.precision.x__cpu_flags__mutmut_{i}": "'ASCII' is the ascii codec; "
        "the locale's UTF-8 with errors='ignore' reads the same ASCII keys and flags"
        for i in (2, 5, 10)
    },
    **{
        f"d3sr_core.inference.tiling.x_{name}__mutmut_{i}": "CPU-only: device None / omitted "
        "is the CPU, like the latent's"
        for name, i in (
            ("blend_weights", 7),
            ("blend_weights", 12),
            ("gaussian_weights", 29),
            *(("tiled_model_output", i) for i in (37, 41, 48, 54, 62, 68)),
        )
    },
    **{
        f"d3sr_core.inference.tiling.x_gaussian_weights__mutmut_{i}": "float32 ones in "
        "torch.outer with a float64 axis promote to float64; ones are exact in both"
        for i in (7, 9)
    },
    **{
        f"d3sr_core.inference.tiling.x_tiled_model_output__mutmut_{i}": "the shortcut for one "
        "tile covering the latent: the blending path gives the same bits (weight 1 everywhere: "
        "out * 1 / 1) and the same tick; tile_grid's tiles always cover the latent"
        for i in (9, 10, 11, 13, 14, 15, 16, 17, 22, 23)
    },
    **{
        f"d3sr_core.inference.tiling.x_tiled_model_output__mutmut_{i}": "blend weights with a "
        "wrong height/width: on an axis with a single span every tile has the same profile, "
        "which cancels in acc / norm"
        for i in (35, 36, 39, 40)
    },
    **{
        f"d3sr_core.inference.tiling.x_tiled_model_output__mutmut_{i}": "dtype None is the "
        "default float32"
        for i in (47, 53, 61, 67)
    },
    **{
        f"d3sr_core.inference.tiling.x_tiled_model_output__mutmut_{i}": "a 3-d acc / norm "
        "buffer broadcasts to the same [1, C, H, W] result"
        for i in (49, 63, 64)
    },
    "d3sr_core.inference.tiling.x_tile_spans__mutmut_9": "length is an int: length <= t + t "
    "// 16 exactly when length <= t + t / 16",
    "d3sr_core.inference.tiling.x_plan_latent_tiles__mutmut_90": "int() of the min of positive "
    "numbers floors budget / per_tile like //",
    "d3sr_core.inference.unet_attention.x_enable_windowed_attention__mutmut_22": "sample.shape"
    "[+2] of the UNet's 4-d sample is shape[-2]",
    "d3sr_core.inference.unet_attention.x_windowed_self_attention__mutmut_142": "default None "
    "instead of False for a missing residual_connection: both falsy",
    "d3sr_core.inference.unet_attention.x_windowed_self_attention__mutmut_68": "CPU-only: the "
    "output buffer's device None is the CPU, like q's",
    "d3sr_core.inference.unet_attention.x_windowed_self_attention__mutmut_75": "CPU-only: the "
    "output buffer without device is on the CPU, like q",
    **{
        f"d3sr_core.inference.latent.x_probe_image__mutmut_{i}": "torch.meshgrid's default "
        "indexing is 'ij' (it only warns)"
        for i in (5, 8)
    },
    **{
        f"d3sr_core.inference.latent.x_probe_image__mutmut_{i}": "the pattern lies in [0, 1] by "
        "construction (x, y(1-x), blob/2 + (1 + sin)/4): dropping or widening a clamp bound "
        "changes nothing"
        for i in (58, 59, 61, 63)
    },
    "d3sr_core.inference.latent.x_latent_output_shape__mutmut_2": "shape[+2:] of the validated "
    "4-d latent shape is shape[-2:]",
    "d3sr_core.loading.checkpoint.x_load_checkpoint__mutmut_155": "break instead of continue "
    "when the unet has no tensors: the missing UNet adapter is refused right after either way",
    **{
        _A + str(i): "shape[+2:] / shape[+2] of the documented 4-d tensors is shape[-2:] / "
        "shape[-2]"
        for i in (23, 31, 40, 81)
    },
    _A + "24": "shape[-3:] of alpha [B, 1, H, W] adds the channel size 1: same max",
    _A + "38": _ONE_SIDE,
    _A + "45": _ONE_SIDE,
    _A + "80": "F.interpolate's default mode is 'nearest'",
    _O + "164": "GeneratorConfig's default base is 'sd21-base'",
    "d3sr_core.models.lora.x__param__mutmut_7": "get_submodule('') is the model itself",
    **{
        f"d3sr_core.models.lora.x_split_peft_state_dict__mutmut_{i}": "'weight'[:-len('.weight')] "
        "is '' anyway"
        for i in (21, 24, 25)
    },
    "d3sr_core.models.lora.x_split_peft_state_dict__mutmut_18": "rpartition instead of partition "
    "differs only for a key holding '.lora_A.' twice (a module named lora_A inside the path, or "
    "an adapter named lora_A): ambiguous, peft's keys have neither",
    "d3sr_core.models.lora.x_split_peft_state_dict__mutmut_30": "break instead of continue in the "
    "adapter filter: a key holds only one of the two markers, nothing is left to check",
    "d3sr_core.models.lora.xǁMergedLoraǁ__init____mutmut_42": "a real 1-row slice instead of a "
    "meta one: same delta shape, only cost",
    "d3sr_core.models.lora.xǁMergedLoraǁ__init____mutmut_46": "a real 1-column slice instead of a "
    "meta one: same delta shape, only cost",
    "d3sr_core.models.lora.x__add_scaled__mutmut_1": "float32: .float() is the tensor itself, so "
    "copy_ of the in-place sum; half: add_ of a float32 delta is computed in float32, rounded once",
    "d3sr_core.models.lora.x__add_scaled__mutmut_7": "copy_ casts to the parameter's dtype anyway",
    "d3sr_core.models.lora.x_count_lora_parameters__mutmut_20": "groups divides in_channels: "
    "in / groups is the same number as in // groups",
    "d3sr_core.loading.osediff.x__tensor_dict__mutmut_11": "tensor_problem(finite=None) tests "
    "`if finite and ...`: None is falsy like False",
    _O + "166": "GeneratorConfig's default prediction_type is 'epsilon'",
    _E + "rgb_to_gray__mutmut_7": "x[:, 2:4] of a 3-channel image is x[:, 2:3]",
    **{
        _E + f"sobel_magnitude__mutmut_{i}": "kornia.filters.sobel's defaults are "
        "normalized=True, eps=1e-6: dropping the argument changes nothing"
        for i in (20, 21, 36, 37)
    },
    _C + "_halo__mutmut_1": "a larger halo only adds real neighbour rows: same result",
    _C + "_halo__mutmut_3": "a larger halo only adds real neighbour rows: same result",
    _C + "_mean_std__mutmut_8": "var(correction=None) is the default correction, 1",
    _C + "_mean_std__mutmut_10": "var() without correction is the default correction, 1",
    _C + "wavelet_blur__mutmut_12": "CPU-only: _BLUR.to(device=None) stays on the CPU",
    _C + "wavelet_blur__mutmut_14": "CPU-only: _BLUR.to() without device stays on the CPU",
    **{_C + f"wavelet_color_fix__mutmut_{i}": _BANDS for i in (12, 14, 15, 16, 17, 18, 23, 36)},
    **{
        _C + f"wavelet_color_fix__mutmut_{i}": "a result buffer in the output's dtype: clamp to "
        "[0, 1] and rounding commute, and the maths is float32 (.float()) either way"
        for i in (28, 30)
    },
    _S + "_broadcast__mutmut_4": "CPU-only: as_tensor(device=None) is the CPU, like.device too",
    _S + "_broadcast__mutmut_7": "CPU-only: as_tensor without device is the CPU, like.device too",
    _S + "_broadcast__mutmut_9": "a 0-d abar reshaped to [1,1,1,1] broadcasts like the 0-d one "
    "against the documented [B,C,H,W] inputs",
    _G + "r1_penalty__mutmut_5": "retain_graph=None defaults to create_graph, which is True",
    _G + "r1_penalty__mutmut_9": "retain_graph omitted defaults to create_graph, which is True",
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout"}
STATUS.update({c: "timeout" for c in (-24, 24, 152, 255)})


def _mutmut_section(module: str, tests: list[str]) -> str:
    return (
        "[tool.mutmut]\n"
        'source_paths = ["d3sr_core"]\n'
        f"only_mutate = {json.dumps([module])}\n"
        'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'process_isolation = "fork"\n'
        "use_git_change_detection = false\n"
    )


def _work_name(module: str) -> str:
    """``d3sr_core/inference/tiled_vae/ops.py`` -> ``inference.tiled_vae.ops`` (unique per module)."""
    return ".".join(Path(module).with_suffix("").parts[1:])


def prepare(module: str, tests: list[str], workdir: Path) -> Path:
    """Fresh copy of the sources and tests in ``workdir/<module stem>`` with the module's config."""
    work = workdir / _work_name(module)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("d3sr_core", "tests"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\[tool\.mutmut\]\n(?:(?!\[).*\n|\n)*", "", text)
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n" + _mutmut_section(module, tests))
    return work


def summarise(work: Path, module: str) -> dict[str, int | float]:
    """Counts by status from mutmut's result file for ``module`` (equivalent ones apart)."""
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
    codes = meta["exit_code_by_key"]
    counts: Counter[str] = Counter()
    survivors = []
    for name, code in codes.items():
        if name in EQUIVALENT:
            counts["equivalent"] += 1
            continue
        status = "not checked" if code is None else STATUS.get(code, "suspicious")
        counts[status] += 1
        if status != "killed" and status != "timeout":
            survivors.append(f"{name}: {status}")
    detected = counts["killed"] + counts["timeout"]
    checked = detected + counts["survived"] + counts["no tests"] + counts["suspicious"]
    result: dict[str, int | float] = {"generated": len(codes), **counts}
    result["score %"] = round(100.0 * detected / checked, 1) if checked else 0.0
    for line in sorted(survivors):
        print("   ", line)
    return result


def table(workdir: Path) -> None:
    """A markdown table of the last results of every module run under ``workdir``, and the
    total (equivalent mutants left out; "no tests" counted as not detected)."""
    cols = ("generated", "killed", "timeout", "survived", "no tests", "equivalent", "not checked")
    total: Counter[str] = Counter()
    print("| module | " + " | ".join(cols) + " | score |")
    print("|---" * (len(cols) + 2) + "|")
    for module in MODULE_TESTS:
        work = workdir / _work_name(module)
        if not (work / "mutants" / (module + ".meta")).exists():
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            counts = summarise(work, module)
        total.update({k: int(v) for k, v in counts.items() if k in cols})
        row = " | ".join(str(counts.get(c, 0)) for c in cols)
        print(f"| `{module.removeprefix('d3sr_core/')}` | {row} | {counts['score %']} % |")
    detected = total["killed"] + total["timeout"]
    checked = detected + total["survived"] + total["no tests"]
    score = round(100.0 * detected / checked, 1) if checked else 0.0
    print("| **all run** | " + " | ".join(str(total[c]) for c in cols) + f" | **{score} %** |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "module", nargs="?", help="path of the module to mutate, e.g. d3sr_core/models/schedule.py"
    )
    parser.add_argument(
        "--tests", nargs="+", help="pytest arguments instead of MODULE_TESTS[module]"
    )
    parser.add_argument(
        "--max-children", type=int, default=1, help="parallel mutant workers (default 1)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/d3sr-mutation"), help="where the copies go"
    )
    parser.add_argument("--fresh", action="store_true", help="discard mutmut's cache and results")
    parser.add_argument(
        "--summary", action="store_true", help="only print the counts of the last run"
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="rerun only the last survivors and not-covered mutants (after adding tests)",
    )
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    parser.add_argument(
        "--table", action="store_true", help="markdown table of every module's last results"
    )
    args = parser.parse_args()
    if args.table:
        table(args.workdir)
        return
    if args.list or not args.module:
        for module, tests in MODULE_TESTS.items():
            print(f"{module}: {' '.join(tests)}")
        return
    tests = args.tests or MODULE_TESTS.get(args.module)
    if not tests:
        parser.error(
            f"no tests known for {args.module}; pass --tests (known: {', '.join(MODULE_TESTS)})"
        )
    work = args.workdir / _work_name(args.module)
    if not args.summary:
        if args.fresh:
            shutil.rmtree(work / "mutants", ignore_errors=True)
        work = prepare(args.module, tests, args.workdir)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.setdefault("OMP_NUM_THREADS", "1")
        # mutmut's children leave with os._exit, so pytest never unlocks its numbered temp
        # folders and never deletes them: one per mutant, up to hundreds of MB each (this filled
        # a 64 GB disk). With one worker every mutant's pytest reuses (and first empties) one
        # --basetemp; with several, TMPDIR keeps the folders here, emptied after the run. Given
        # through the environment, not [tool.mutmut]: a changed pytest_add_cli_args makes mutmut
        # discard every cached result.
        (work / "tmp").mkdir(exist_ok=True)
        env["TMPDIR"] = str(work / "tmp")
        if args.max_children == 1:
            basetemp = f"--basetemp={work / 'tmp' / 'pytest'}"
            env["PYTEST_ADDOPTS"] = f"{env.get('PYTEST_ADDOPTS', '')} {basetemp}".strip()
        cmd = ["mutmut", "run", "--max-children", str(args.max_children)]
        if args.survivors:
            meta = json.loads((work / "mutants" / (args.module + ".meta")).read_text())
            names = [  # survived, or not covered by the selection's tests
                k
                for k, v in meta["exit_code_by_key"].items()
                if STATUS.get(v) in ("survived", "no tests") and k not in EQUIVALENT
            ]
            if not names:
                print(json.dumps(summarise(work, args.module)))
                return
            cmd += names
        print("+", " ".join(cmd), f"(in {work}; tests: {' '.join(tests)})", flush=True)
        try:
            subprocess.run(cmd, cwd=work, env=env, check=False)
        finally:
            shutil.rmtree(work / "tmp", ignore_errors=True)
    print(json.dumps(summarise(work, args.module)))


if __name__ == "__main__":
    sys.exit(main())
