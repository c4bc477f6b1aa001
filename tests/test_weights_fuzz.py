"""Mutated weights files: every one must end in one WeightsFileError that names the file.

Each case starts from a valid tiny D3SR checkpoint or OSEDiff pickle and breaks one thing
(truncation, header bytes, field types, ranks, shapes, dtypes, NaN, type-confused pickle
fields, code-executing pickles). The loader must refuse it with a one-line message that
names the user's path exactly once - never a RuntimeError/KeyError from deep inside, and
never by merging part of it into the base.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from make_tiny_weights import tiny_checkpoint
from safetensors.torch import save_file
from tiny_models import tiny_prompt_embeds, tiny_unet, tiny_vae

from d3sr_core.loading.base import BaseModel
from d3sr_core.loading.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    checkpoint_state_dict,
    load_checkpoint,
)
from d3sr_core.loading.files import WeightsFileError, read_state_dict
from d3sr_core.loading.generator import build_generator
from d3sr_core.loading.osediff import osediff_to_checkpoint, read_osediff
from d3sr_core.models.configs import bundled_config

CONV = "unet.down_blocks.0.resnets.0.conv1"
LINEAR = "unet.mid_block.attentions.0.proj_in"


class CodeRunner:
    """Pickles as a call to os.system: loading it would run a command."""

    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


# --------------------------------------------------------------------------- file builders


def d3sr_parts() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    ckpt = tiny_checkpoint()
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(ckpt.config.to_dict()),
        "adapters": json.dumps({"unet": {"scale": 1.0}}),
    }
    return checkpoint_state_dict(ckpt), meta


def write_d3sr(path: Path, tensors=None, meta=None) -> Path:
    base_tensors, base_meta = d3sr_parts()
    save_file(tensors or base_tensors, str(path), metadata=meta or base_meta)
    return path


def tensor_case(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        tensors, meta = d3sr_parts()
        change(tensors)
        return write_d3sr(path, tensors, meta)

    return build


def meta_case(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        tensors, meta = d3sr_parts()
        change(meta)
        return write_d3sr(path, tensors, meta)

    return build


def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def header_case(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    """Rewrite the JSON header (``change`` may edit it in place or return a replacement)."""

    def build(path: Path) -> Path:
        header, body = split_file(write_d3sr(path).read_bytes())
        result = change(header)
        text = json.dumps(header if result is None else result).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + body)
        return path

    return build


def bytes_case(change: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_bytes(change(write_d3sr(path).read_bytes()))
        return path

    return build


def entry(header: dict, key: str) -> dict:
    return header[key]


def set_config(meta: dict, **fields) -> None:
    config = json.loads(meta["config"])
    config.update(fields)
    meta["config"] = json.dumps(config)


def rename(tensors: dict, old: str, new: str) -> None:
    tensors[new] = tensors.pop(old)


D3SR_CASES: dict[str, Callable[[Path], Path]] = {
    "empty file": bytes_case(lambda b: b""),
    "4 bytes": bytes_case(lambda b: b[:4]),
    "cut inside the header": bytes_case(lambda b: b[:40]),
    "cut inside the data": bytes_case(lambda b: b[:-10]),
    "header length huge": bytes_case(lambda b: struct.pack("<Q", 2**62) + b[8:]),
    "header length past the end": bytes_case(lambda b: struct.pack("<Q", len(b)) + b[8:]),
    "header not JSON": bytes_case(lambda b: b[:8] + b"\xff" * (len(b) - 8)),
    "header is a JSON list": header_case(lambda h: [1, 2, 3]),
    "header is a JSON string": header_case(lambda h: "weights"),
    "__metadata__ a list": header_case(lambda h: h.update({"__metadata__": ["format"]})),
    "metadata value an int": header_case(lambda h: h["__metadata__"].update({"format": 1})),
    "tensor entry a string": header_case(lambda h: h.update({"prompt_embeds": "x"})),
    "dtype an int": header_case(lambda h: entry(h, "prompt_embeds").update({"dtype": 7})),
    "dtype unknown": header_case(lambda h: entry(h, "prompt_embeds").update({"dtype": "F33"})),
    "shape a string": header_case(lambda h: entry(h, "prompt_embeds").update({"shape": "1x77"})),
    "shape negative": header_case(
        lambda h: entry(h, "prompt_embeds").update({"shape": [-1, 77, 32]})
    ),
    "offsets three numbers": header_case(
        lambda h: entry(h, "prompt_embeds").update({"data_offsets": [0, 1, 2]})
    ),
    "offsets disagree with shape": header_case(
        lambda h: entry(h, "prompt_embeds").update({"shape": [1, 78, 32]})
    ),
    "no format entry": meta_case(lambda m: m.pop("format")),
    "config not JSON": meta_case(lambda m: m.update({"config": "{timestep: 3"})),
    "config a JSON list": meta_case(lambda m: m.update({"config": "[1, 2]"})),
    "config timestep a string": meta_case(lambda m: set_config(m, timestep="399")),
    "config targets not strings": meta_case(lambda m: set_config(m, lora_targets=[1, 2])),
    "config prediction type unknown": meta_case(lambda m: set_config(m, prediction_type="x0")),
    "format_version text": meta_case(lambda m: m.update({"format_version": "one"})),
    "format_version from the future": meta_case(lambda m: m.update({"format_version": "99"})),
    "adapters scale a string": meta_case(
        lambda m: m.update({"adapters": json.dumps({"unet": {"scale": "big"}})})
    ),
    "adapters scale NaN": meta_case(lambda m: m.update({"adapters": '{"unet": {"scale": NaN}}'})),
    "adapters a list": meta_case(lambda m: m.update({"adapters": "[]"})),
    "A/B ranks differ": tensor_case(
        lambda t: t.update({f"{CONV}.lora_B.weight": torch.zeros(16, 3, 1, 1)})
    ),
    "rank 0": tensor_case(
        lambda t: t.update(
            {
                f"{LINEAR}.lora_A.weight": torch.zeros(0, 64),
                f"{LINEAR}.lora_B.weight": torch.zeros(64, 0),
            }
        )
    ),
    "integer LoRA tensor": tensor_case(
        lambda t: t.update({f"{CONV}.lora_A.weight": torch.ones(4, 16, 3, 3, dtype=torch.int32)})
    ),
    "NaN in LoRA": tensor_case(
        lambda t: t[f"{LINEAR}.lora_A.weight"].view(-1).__setitem__(3, float("nan"))
    ),
    "inf in prompt_embeds": tensor_case(
        lambda t: t["prompt_embeds"].view(-1).__setitem__(0, float("inf"))
    ),
    "prompt_embeds integer": tensor_case(
        lambda t: t.update({"prompt_embeds": torch.zeros(1, 77, 32, dtype=torch.int64)})
    ),
    "prompt_embeds 2-D": tensor_case(lambda t: t.update({"prompt_embeds": torch.zeros(77, 32)})),
    "lora_B missing": tensor_case(lambda t: t.pop(f"{CONV}.lora_B.weight")),
    "LoRA A 3-D": tensor_case(
        lambda t: t.update({f"{LINEAR}.lora_A.weight": torch.zeros(4, 64, 1)})
    ),
    "two unknown targets": tensor_case(
        lambda t: (
            rename(t, f"{CONV}.lora_A.weight", "unet.nowhere.conv1.lora_A.weight"),
            rename(t, f"{CONV}.lora_B.weight", "unet.nowhere.conv1.lora_B.weight"),
            rename(t, f"{LINEAR}.lora_A.weight", "unet.elsewhere.proj.lora_A.weight"),
            rename(t, f"{LINEAR}.lora_B.weight", "unet.elsewhere.proj.lora_B.weight"),
        )
    ),
    "delta shape does not fit the module": tensor_case(
        lambda t: t.update({f"{CONV}.lora_A.weight": torch.zeros(4, 17, 3, 3)})
    ),
    "prompt width does not fit the UNet": tensor_case(
        lambda t: t.update({"prompt_embeds": torch.zeros(1, 77, 48)})
    ),
    "unknown tensor name": tensor_case(lambda t: t.update({"extra": torch.zeros(1)})),
    "replacement of the wrong shape": tensor_case(
        lambda t: t.update({"replace.unet.conv_in.weight": torch.zeros(16, 4, 1, 1)})
    ),
}


def shared_osediff(tmp_path_factory) -> Path:
    """A tiny osediff.pkl (built with peft, a few seconds), made once per test session."""
    from test_checkpoint import make_osediff

    path = tmp_path_factory.getbasetemp() / "shared-osediff" / "osediff.pkl"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        make_osediff(path.parent)
    return path


@pytest.fixture(scope="module")
def osediff_state(tmp_path_factory) -> dict:
    return torch.load(str(shared_osediff(tmp_path_factory)), weights_only=True)


def first_key(state: dict, field: str, marker: str = "lora_A") -> str:
    return next(k for k in state[field] if marker in k)


def osediff_case(change: Callable[[dict], object], whole: bool = False) -> Callable[[dict], object]:
    """Edit a copy of the state in place, or (``whole``) replace it by what ``change`` returns."""

    def build(state: dict) -> object:
        state = {
            k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in state.items()
        }
        result = change(state)
        return result if whole else state

    return build


OSEDIFF_CASES: dict[str, Callable[[dict], dict]] = {
    "rank a string": osediff_case(lambda s: s.update({"rank_unet": "4"})),
    "rank a float": osediff_case(lambda s: s.update({"rank_unet": 4.5})),
    "rank a bool": osediff_case(lambda s: s.update({"rank_vae": True})),
    "rank negative": osediff_case(lambda s: s.update({"rank_vae": -4})),
    "rank disagrees with tensors": osediff_case(lambda s: s.update({"rank_unet": 8})),
    "state dict a list": osediff_case(lambda s: s.update({"state_dict_unet": [1, 2]})),
    "tensor replaced by a string": osediff_case(
        lambda s: s["state_dict_vae"].update({first_key(s, "state_dict_vae"): "weights"})
    ),
    "integer key": osediff_case(lambda s: s["state_dict_unet"].update({7: torch.zeros(1)})),
    "module list a string": osediff_case(
        lambda s: s.update({"unet_lora_encoder_modules": "down_blocks"})
    ),
    "module list of ints": osediff_case(lambda s: s.update({"vae_lora_encoder_modules": [1, 2]})),
    "listed module without tensors": osediff_case(
        lambda s: s["unet_lora_others_modules"].append("mid_block.not_there")
    ),
    "absurd tensor size": osediff_case(
        lambda s: s["state_dict_unet"].update(
            {first_key(s, "state_dict_unet"): torch.zeros(1).expand(1 << 20, 1 << 20)}
        )
    ),
    "NaN in a LoRA factor": osediff_case(
        lambda s: s["state_dict_unet"].update(
            {first_key(s, "state_dict_unet"): torch.full((4, 320), float("nan"))}
        )
    ),
    "lora_A without lora_B": osediff_case(
        lambda s: s["state_dict_vae"].pop(first_key(s, "state_dict_vae", "lora_B"))
    ),
    "top level a list": osediff_case(lambda s: [s], whole=True),
    "missing rank": osediff_case(lambda s: s.pop("rank_vae")),
}


def load_and_fit(path: Path, base: BaseModel) -> None:
    """What loading does with a weights file, up to (and including) the merge checks."""
    if path.suffix == ".safetensors":
        ckpt = load_checkpoint(path)
    else:
        ckpt = osediff_to_checkpoint(read_osediff(path), tiny_prompt_embeds(), path)
    build_generator(base, ckpt, 1.0, str(path))


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny")


def assert_clear_refusal(path: Path, base: BaseModel) -> str:
    weights = [p.clone() for p in base.unet.parameters()]
    with pytest.raises(WeightsFileError) as info:
        load_and_fit(path, base)
    message = str(info.value)
    assert message.count(str(path)) == 1, message  # named once, not "P: P: ..."
    assert "\n" not in message and len(message) < 600, message
    assert all(torch.equal(a, b) for a, b in zip(weights, base.unet.parameters(), strict=True))
    return message


def test_valid_files_load(tmp_path, base, osediff_state):
    """The unmutated sources load (so every failure below is the mutation's)."""
    load_and_fit(
        write_d3sr(tmp_path / "ok.safetensors"),
        BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny"),
    )
    torch.save(osediff_state, str(tmp_path / "ok.pkl"))
    load_and_fit(
        tmp_path / "ok.pkl",
        BaseModel(tiny_unet(), tiny_vae(), bundled_config("sd21-base", "scheduler"), "tiny"),
    )


def test_mutated_d3sr_files_are_refused_clearly(tmp_path, base):
    messages = {}
    for i, (name, build) in enumerate(D3SR_CASES.items()):
        path = build(tmp_path / f"case{i}.safetensors")
        messages[name] = assert_clear_refusal(path, base)
    assert len(messages) >= 30
    assert "nowhere.conv1" in messages["two unknown targets"]
    assert "elsewhere.proj" in messages["two unknown targets"]
    assert "rank 4" in messages["A/B ranks differ"] and "rank 3" in messages["A/B ranks differ"]
    assert "NaN" in messages["NaN in LoRA"]
    assert "header is a JSON list" in messages["header is a JSON list"]


def test_mutated_osediff_pickles_are_refused_clearly(tmp_path, base, osediff_state):
    messages = {}
    for i, (name, build) in enumerate(OSEDIFF_CASES.items()):
        path = tmp_path / f"case{i}.pkl"
        torch.save(build(osediff_state), str(path))
        messages[name] = assert_clear_refusal(path, base)
    assert "int" in messages["rank a string"]
    assert "implausibly many" in messages["absurd tensor size"]
    assert "mid_block.not_there" in messages["listed module without tensors"]
    assert "incomplete" in messages["lora_A without lora_B"]
    assert "rank_vae" in messages["missing rank"]
    assert "rank_unet is a str" in messages["rank a string"]
    for name, field, kind in (
        ("module list a string", "unet_lora_encoder_modules", "str"),
        ("module list of ints", "vae_lora_encoder_modules", "list"),
    ):
        assert f"{field} is {kind} " in messages[name], messages[name]
        assert messages[name].endswith("expected a list of module names"), messages[name]
    assert messages["rank a bool"].endswith("rank_vae is a bool (True), expected an int")
    assert "rank_vae = -4, expected 1.." in messages["rank negative"]
    assert messages["state dict a list"].endswith("state_dict_unet is a list, expected a dict")
    assert ": state_dict_vae: encoder." in messages["tensor replaced by a string"]
    # values are checked where they are merged, which names the LoRA pair
    assert "UNet LoRA: conv_in.lora_A holds NaN" in messages["NaN in a LoRA factor"]
    top = messages["top level a list"]
    assert "not an OSEDiff checkpoint" in top and top.endswith("found list"), top

    data = (tmp_path / "case0.pkl").read_bytes()
    for i, cut in enumerate((len(data) // 2, 100, 3)):
        path = tmp_path / f"cut{i}.pkl"
        path.write_bytes(data[:cut])
        assert_clear_refusal(path, base)


def test_pickle_needing_code_gets_a_one_line_refusal(tmp_path, base, capsys):
    path = tmp_path / "evil.pkl"
    torch.save({"state_dict_unet": CodeRunner(), "rank_unet": 4}, str(path))
    message = assert_clear_refusal(path, base)
    assert message.startswith(f"{path}: refused: loading this pickle would run code")
    assert "imports posix.system" in message or "imports nt.system" in message
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(CodeRunner()))
    assert "would run code" in str(pytest.raises(WeightsFileError, read_state_dict, legacy).value)
    assert "should-never-run" not in capsys.readouterr().out


def test_damaged_base_folders_are_refused_clearly(tmp_path):
    import shutil

    from make_tiny_weights import write_tiny_base

    from d3sr_core.loading.base import load_base

    good = write_tiny_base(tmp_path / "good")

    def broken_json(folder: Path) -> None:
        (folder / "unet" / "config.json").write_text('{"_class_name": ')

    def json_list(folder: Path) -> None:
        (folder / "vae" / "config.json").write_text("[]")

    def truncated_unet(folder: Path) -> None:
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])

    def bad_dtype(folder: Path) -> None:
        weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        header, body = split_file(weights.read_bytes())
        next(v for k, v in header.items() if k != "__metadata__")["dtype"] = 5
        text = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + body)

    for i, damage in enumerate((broken_json, json_list, truncated_unet, bad_dtype)):
        folder = tmp_path / f"base{i}"
        shutil.copytree(good, folder)
        damage(folder)
        with pytest.raises(WeightsFileError) as info:
            load_base(folder)
        message = str(info.value)
        assert message.startswith(f"{folder}: ") and message.count(str(folder)) == 1, message
        assert "\n" not in message


def test_osediff_dict_missing_keys_names_them(osediff_state):
    """A dict that passes the quick check but lacks keys: the default name and the keys."""
    from d3sr_core.loading.osediff import OSEDIFF_KEYS

    state = {k: v for k, v in osediff_state.items() if k != "rank_vae"}
    with pytest.raises(WeightsFileError) as info:
        osediff_to_checkpoint(state, tiny_prompt_embeds())
    assert str(info.value) == (
        f"<osediff>: not an OSEDiff checkpoint: missing top-level keys ['rank_vae'] "
        f"(expected {list(OSEDIFF_KEYS)})"
    )


def test_non_osediff_dict_lists_its_first_six_keys(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({k: 0 for k in "abcdefgh"}, str(path))
    with pytest.raises(WeightsFileError) as info:
        read_osediff(path)
    assert str(info.value).endswith("found ['a', 'b', 'c', 'd', 'e', 'f']")


def _nan_conv_in(state: dict) -> None:
    state["state_dict_unet"]["conv_in.base_layer.weight"].fill_(float("nan"))


def _nan_vae_factor(state: dict) -> None:
    state["state_dict_vae"][first_key(state, "state_dict_vae")].fill_(float("nan"))


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda s: s["state_dict_unet"].update(
                {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
            ),
            "<osediff>: unexpected UNet tensor 'down_blocks.0.resnets.0.conv1.weight' "
            "(OSEDiff stores only LoRA and conv_in)",
        ),
        (
            lambda s: s.update(
                {
                    "state_dict_unet": {
                        k: v for k, v in s["state_dict_unet"].items() if "lora" not in k
                    }
                }
            ),
            "<osediff>: OSEDiff checkpoint holds no UNet LoRA tensors",
        ),
        (_nan_conv_in, "<osediff>: UNet conv_in: "),
        (
            _nan_vae_factor,
            "<osediff>: VAE LoRA: encoder.conv_in.lora_A holds NaN or infinite values",
        ),
        (
            lambda s: s.update({"rank_vae": 2}),
            "<osediff>: VAE LoRA: encoder.conv_in: rank 4, the file declares rank 2",
        ),
    ],
    ids=["unexpected tensor", "no unet lora", "nan conv_in", "nan vae factor", "vae rank"],
)
def test_osediff_conversion_refusals_name_the_part(osediff_state, change, message):
    state = copy.deepcopy(osediff_state)
    change(state)
    with pytest.raises(WeightsFileError) as info:
        osediff_to_checkpoint(state, tiny_prompt_embeds())
    assert str(info.value).startswith(message), str(info.value)


def test_osediff_conversion_records_what_osediff_trained(osediff_state):
    """The converted checkpoint's config: SD2.1-base, timestep 999, epsilon, the UNet LoRA's
    rank, peft's default alpha 8 (OSEDiff never sets one) and OSEDiff's 14 target names."""
    config = osediff_to_checkpoint(copy.deepcopy(osediff_state), tiny_prompt_embeds()).config
    assert (config.base, config.timestep, config.prediction_type) == ("sd21-base", 999, "epsilon")
    assert (config.lora_rank, config.lora_alpha) == (osediff_state["rank_unet"], 8.0)
    assert config.lora_targets == [
        "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
        "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
    ]  # fmt: skip


def test_osediff_module_list_may_name_peft_base_layers(osediff_state):
    """peft wraps a LoRA target as ``<name>.base_layer``; a module list naming that wrapper
    refers to the LoRA of ``<name>`` (conv_in's here), not to a missing module."""
    state = copy.deepcopy(osediff_state)
    state["unet_lora_others_modules"].append("conv_in.base_layer")
    osediff_to_checkpoint(state, tiny_prompt_embeds())
    state["unet_lora_others_modules"].append("mid_block.not_there.base_layer")
    with pytest.raises(WeightsFileError, match="mid_block.not_there"):
        osediff_to_checkpoint(state, tiny_prompt_embeds())
