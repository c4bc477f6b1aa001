"""The fixed empty-prompt embedding D3SR conditions its UNet on, in plain torch.

D3SR feeds its SD2.1 UNet one constant ``[1, 77, 1024]`` embedding: the empty prompt ``""``
encoded by SD2.1's own text encoder (OpenCLIP ViT-H/14 text tower). This module computes it
from the text-encoder weights with nothing but torch, so that neither ``transformers`` nor
``open_clip`` is needed at runtime (inference hosts may have an old ``transformers`` or none).

Two weight layouts are understood:

* Hugging Face ``CLIPTextModel`` (a diffusers ``text_encoder/`` folder): the embedding is
  ``last_hidden_state``, i.e. ``final_layer_norm`` applied after all ``num_hidden_layers``
  layers. SD2.x's diffusers export already drops the last of OpenCLIP's 24 blocks (23 layers).
* Original LDM / OpenCLIP (``cond_stage_model.model.*`` in a single-file SD2.x checkpoint):
  24 ``resblocks``; SD2 uses the *penultimate* output (``FrozenOpenCLIPEmbedder(layer=
  "penultimate")``): run blocks 0..22, skip the last, then ``ln_final``.

Token ids need no tokenizer: ``""`` is ``[BOS=49406, EOS=49407]`` followed by padding, and
SD2.x pads with id 0 (``"!"``): ``open_clip.tokenize`` zero-fills, and SD2.x's Hugging Face
tokenizer has ``pad_token = "!"`` (id 0). Attention is causal, so the pad tokens do not change
the BOS/EOS rows but do get their own (position-dependent) rows, which the UNet attends to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .files import (
    SAFETENSORS_SUFFIXES,
    WeightsFileError,
    read_safetensors_metadata,
    read_state_dict,
)

__all__ = [
    "BOS_ID",
    "EMPTY_PROMPT_IDS",
    "EOS_ID",
    "PAD_ID",
    "empty_prompt_embeds",
    "empty_prompt_ids",
    "encode_empty_prompt_hf_clip",
    "encode_empty_prompt_openclip",
]

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
PAD_ID = 0  # "!" -- SD2.x / OpenCLIP padding (SD1.x's tokenizer pads with EOS instead)
CONTEXT_LENGTH = 77
OPENCLIP_HEAD_DIM = 64  # ViT-H text tower: width 1024, 16 heads

LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
HF_TEXT_PREFIX = "text_model."


def empty_prompt_ids(
    length: int = CONTEXT_LENGTH,
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
) -> Tensor:
    """Token ids of the empty prompt, ``[1, length]`` int64: BOS, EOS, then ``pad_id``."""
    if length < 2:
        raise ValueError(f"context length must be >= 2 (BOS + EOS), got {length}")
    ids = torch.full((1, length), pad_id, dtype=torch.long)
    ids[0, 0] = bos_id
    ids[0, 1] = eos_id
    return ids


#: The empty prompt as SD2.x tokenizes it: ``(49406, 49407, 0, 0, ..., 0)``, 77 ids.
EMPTY_PROMPT_IDS: tuple[int, ...] = tuple(empty_prompt_ids()[0].tolist())


# --------------------------------------------------------------------------- building blocks


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU: OpenCLIP nn.GELU, SD2.x text_encoder config
    "quick_gelu": _quick_gelu,  # OpenAI CLIP (SD1.x)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported text-encoder activation {name!r}; known: {sorted(_ACTIVATIONS)}"
        ) from None


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


def _get(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    try:
        return _f32(sd[key])
    except KeyError:
        raise KeyError(f"{what}: missing text-encoder weight {key!r}") from None


def _block(
    x: Tensor,
    *,
    ln1: tuple[Tensor, Tensor],
    qkv_w: Tensor,
    qkv_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln2: tuple[Tensor, Tensor],
    fc1: tuple[Tensor, Tensor],
    fc2: tuple[Tensor, Tensor],
    heads: int,
    eps: float,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """One pre-LN transformer block with causal self-attention. ``x``: [B, L, D]."""
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), ln1[0], ln1[1], eps)
    q, k, v = F.linear(h, qkv_w, qkv_b).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + F.linear(a.transpose(1, 2).reshape(b, n, d), out_w, out_b)
    h = F.layer_norm(x, (d,), ln2[0], ln2[1], eps)
    return x + F.linear(act(F.linear(h, *fc1)), *fc2)


def _check_heads(width: int, heads: int) -> None:
    if heads <= 0 or width % heads:
        raise ValueError(f"text-encoder width {width} is not divisible by {heads} heads")


def _count_layers(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    if not idx:
        return 0
    n = max(idx) + 1
    missing = sorted(set(range(n)) - idx)
    if missing:
        raise KeyError(f"text-encoder layers {missing} are missing (found up to layer {n - 1})")
    return n


# --------------------------------------------------------------------------- OpenCLIP / LDM


def _openclip_prefix(sd: Mapping[str, Tensor]) -> str | None:
    for prefix in (LDM_OPENCLIP_PREFIX, ""):
        if prefix + "token_embedding.weight" in sd and prefix + "positional_embedding" in sd:
            return prefix
    return None


@torch.no_grad()
def encode_empty_prompt_openclip(
    state_dict: Mapping[str, Tensor],
    skip_last_layers: int = 1,
    *,
    num_heads: int | None = None,
    pad_id: int = PAD_ID,
    layer_norm_eps: float = 1e-5,
) -> Tensor:
    """Encode ``""`` with an OpenCLIP text tower in original (LDM) layout.

    Keys are ``[cond_stage_model.model.]{token_embedding.weight, positional_embedding,
    transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc,
    mlp.c_proj}, ln_final}`` (the prefix is optional; other keys are ignored). Blocks
    ``0 .. n-1-skip_last_layers`` run (SD2: ``skip_last_layers=1``, the penultimate layer),
    then ``ln_final``. Width, depth and context length come from the tensor shapes; heads
    default to ``width // 64`` (ViT-H: 16). Activation is exact GELU (OpenCLIP ``nn.GELU``).

    Returns:
        float32 CPU tensor ``[1, context_length, width]``.
    """
    prefix = _openclip_prefix(state_dict)
    if prefix is None:
        raise KeyError(
            "no OpenCLIP text encoder: expected 'cond_stage_model.model.token_embedding.weight'"
            " and 'positional_embedding' (with or without the 'cond_stage_model.model.' prefix)"
        )
    what = "OpenCLIP text encoder"
    p = prefix
    tok = _get(state_dict, p + "token_embedding.weight", what)
    pos = _get(state_dict, p + "positional_embedding", what)
    width = tok.shape[1]
    heads = num_heads or max(1, width // OPENCLIP_HEAD_DIM)
    _check_heads(width, heads)
    n_layers = _count_layers(state_dict, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
    if not 0 <= skip_last_layers < n_layers:
        raise ValueError(
            f"skip_last_layers={skip_last_layers} but the text encoder has {n_layers} blocks"
        )
    ids = empty_prompt_ids(pos.shape[0], pad_id=pad_id)
    x = (tok[ids] + pos).contiguous()
    for i in range(n_layers - skip_last_layers):
        r = f"{p}transformer.resblocks.{i}."

        def g(name: str, r: str = r) -> Tensor:
            return _get(state_dict, r + name, what)

        x = _block(
            x,
            ln1=(g("ln_1.weight"), g("ln_1.bias")),
            qkv_w=g("attn.in_proj_weight"),
            qkv_b=g("attn.in_proj_bias"),
            out_w=g("attn.out_proj.weight"),
            out_b=g("attn.out_proj.bias"),
            ln2=(g("ln_2.weight"), g("ln_2.bias")),
            fc1=(g("mlp.c_fc.weight"), g("mlp.c_fc.bias")),
            fc2=(g("mlp.c_proj.weight"), g("mlp.c_proj.bias")),
            heads=heads,
            eps=layer_norm_eps,
            act=F.gelu,
        )
    ln = (
        _get(state_dict, p + "ln_final.weight", what),
        _get(state_dict, p + "ln_final.bias", what),
    )
    return F.layer_norm(x, (width,), ln[0], ln[1], layer_norm_eps)


# --------------------------------------------------------------------------- Hugging Face CLIP


def _hf_prefix(sd: Mapping[str, Tensor]) -> str | None:
    suffix = "embeddings.token_embedding.weight"
    found = sorted((k[: -len(suffix)] for k in sd if k.endswith(suffix)), key=len)
    return found[0] if found else None


@torch.no_grad()
def encode_empty_prompt_hf_clip(
    state_dict: Mapping[str, Tensor],
    config: Mapping,
    *,
    pad_id: int = PAD_ID,
) -> Tensor:
    """Encode ``""`` with a Hugging Face ``CLIPTextModel`` state dict (= its ``last_hidden_state``).

    Keys: ``text_model.embeddings.{token,position}_embedding.weight``,
    ``text_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
    mlp.fc1, mlp.fc2}``, ``text_model.final_layer_norm`` (``text_model.`` may be absent or
    preceded by another prefix). ``config`` is the ``config.json`` dict (a full ``CLIPConfig``'s
    ``text_config`` is used when present): ``num_hidden_layers``, ``num_attention_heads``,
    ``hidden_act`` and ``layer_norm_eps`` are read. The config's ``pad_token_id`` is NOT used
    (SD2.1's says 1, but its tokenizer pads with ``"!"`` = 0); pass ``pad_id`` to override.

    Returns:
        float32 CPU tensor ``[1, max_position_embeddings, hidden_size]``.
    """
    cfg = dict(config.get("text_config") or config)
    prefix = _hf_prefix(state_dict)
    if prefix is None:
        raise KeyError(
            "no Hugging Face CLIP text encoder: expected "
            "'text_model.embeddings.token_embedding.weight'"
        )
    what = "CLIPTextModel"
    p = prefix
    tok = _get(state_dict, p + "embeddings.token_embedding.weight", what)
    pos = _get(state_dict, p + "embeddings.position_embedding.weight", what)
    width = tok.shape[1]
    found = _count_layers(state_dict, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    n_layers = int(cfg.get("num_hidden_layers", found))
    if n_layers > found:
        raise KeyError(f"{what}: config says {n_layers} layers but the weights have {found}")
    heads = int(cfg.get("num_attention_heads", max(1, width // OPENCLIP_HEAD_DIM)))
    _check_heads(width, heads)
    eps = float(cfg.get("layer_norm_eps", 1e-5))
    act = _activation(str(cfg.get("hidden_act", "quick_gelu")))  # HF CLIPTextConfig default

    ids = empty_prompt_ids(pos.shape[0], pad_id=pad_id)
    x = (tok[ids] + pos).contiguous()
    for i in range(n_layers):
        r = f"{p}encoder.layers.{i}."

        def g(name: str, r: str = r) -> Tensor:
            return _get(state_dict, r + name, what)

        qkv_w = torch.cat([g(f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_b = torch.cat([g(f"self_attn.{n}_proj.bias") for n in "qkv"])
        x = _block(
            x,
            ln1=(g("layer_norm1.weight"), g("layer_norm1.bias")),
            qkv_w=qkv_w,
            qkv_b=qkv_b,
            out_w=g("self_attn.out_proj.weight"),
            out_b=g("self_attn.out_proj.bias"),
            ln2=(g("layer_norm2.weight"), g("layer_norm2.bias")),
            fc1=(g("mlp.fc1.weight"), g("mlp.fc1.bias")),
            fc2=(g("mlp.fc2.weight"), g("mlp.fc2.bias")),
            heads=heads,
            eps=eps,
            act=act,
        )
    ln_w = _get(state_dict, p + "final_layer_norm.weight", what)
    ln_b = _get(state_dict, p + "final_layer_norm.bias", what)
    return F.layer_norm(x, (width,), ln_w, ln_b, eps)


# --------------------------------------------------------------------------- files and folders

_HF_WEIGHT_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.fp16.safetensors",
    "pytorch_model.fp16.bin",
)
_HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NO_TEXT_ENCODER = (
    "this checkpoint has no text encoder; D3SR needs SD2.x's OpenCLIP text encoder once, to "
    "compute its fixed empty-prompt embedding. Expected 'cond_stage_model.model.*' keys "
    "(original SD2.x single file) or 'text_model.*' keys (Hugging Face CLIPTextModel). Pass a "
    "full SD2.1 checkpoint or a diffusers SD2.1 folder (with text_encoder/), or a D3SR "
    "checkpoint that already stores 'prompt_embeds'."
)


def _unwrap(state: dict) -> dict:
    for key in ("state_dict", "model", "module"):
        inner = state.get(key) if isinstance(state, dict) else None
        if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
            state = inner
    return state


def _is_text_key(key: str) -> bool:
    """Keys that can belong to a text encoder in a single file (the rest is never read)."""
    return key.startswith(
        (
            "cond_stage_model.",  # original SD1/SD2 checkpoints
            "text_model.",  # HF CLIPTextModel, transformers < 5
            "text_encoder.",
            "embeddings.",  # HF CLIPTextModel saved by transformers >= 5 (no prefix)
            "encoder.layers.",
            "final_layer_norm.",
            "transformer.resblocks.",  # bare OpenCLIP
            "ln_final.",
        )
    ) or key in ("token_embedding.weight", "positional_embedding")


def _read_text_weights(path: Path, keep: Callable[[str], bool] = _is_text_key) -> dict:
    """The tensors of one file for which ``keep(key)`` (safetensors are read selectively)."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file():
        from safetensors import safe_open

        read_safetensors_metadata(path)  # clear error for a bad header
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        except Exception as err:  # safetensors raises its own error types
            raise WeightsFileError(
                path, f"damaged or truncated .safetensors file ({err})"
            ) from None
    state = _unwrap(read_state_dict(path))
    if not isinstance(state, dict):
        raise WeightsFileError(path, f"expected a dict of tensors, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, Tensor) and keep(k)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsFileError(path, f"unreadable JSON config ({err})") from None


def _everything(key: str) -> bool:
    return True


def _hf_folder_weights(folder: Path) -> dict[str, Tensor]:
    for name in _HF_WEIGHT_NAMES:
        if (folder / name).is_file():
            return _read_text_weights(folder / name, _everything)
    for name in _HF_INDEX_NAMES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_read_text_weights(folder / shard, _everything))
            return state
    raise WeightsFileError(
        folder,
        "text-encoder folder has no weights (expected one of "
        + ", ".join(_HF_WEIGHT_NAMES + _HF_INDEX_NAMES)
        + ")",
    )


def _guess_hf_config(state: Mapping[str, Tensor], path: Path) -> dict:
    """A config for a bare HF-layout text encoder found in a single file (no config.json)."""
    prefix = _hf_prefix(state) or ""
    width = state[prefix + "embeddings.token_embedding.weight"].shape[1]
    # The two text encoders in SD single files: OpenCLIP ViT-H (SD2.x, width 1024, exact GELU)
    # and OpenAI CLIP ViT-L (SD1.x, width 768, quick GELU). Others: refuse rather than guess.
    acts = {1024: "gelu", 768: "quick_gelu"}
    if width not in acts:
        raise WeightsFileError(
            path,
            f"found a Hugging Face-layout text encoder of width {width} but no config.json "
            "beside it to say its activation; pass a diffusers folder instead",
        )
    return {
        "num_hidden_layers": _count_layers(state, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": width // OPENCLIP_HEAD_DIM,
        "hidden_act": acts[width],
        "layer_norm_eps": 1e-5,
    }


def _encode(state: Mapping[str, Tensor], config: Mapping | None, path: Path) -> Tensor:
    try:
        if _openclip_prefix(state) is not None:
            out = encode_empty_prompt_openclip(state, skip_last_layers=1)
        elif _hf_prefix(state) is not None:
            out = encode_empty_prompt_hf_clip(state, config or _guess_hf_config(state, path))
        else:
            raise WeightsFileError(path, _NO_TEXT_ENCODER)
    except (KeyError, ValueError, RuntimeError, IndexError) as err:
        if isinstance(err, WeightsFileError):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise WeightsFileError(path, f"text encoder weights do not fit ({msg})") from None
    if not torch.isfinite(out).all():
        raise WeightsFileError(path, "text encoder produced non-finite values (damaged weights?)")
    return out


def empty_prompt_embeds(source: str | Path) -> Tensor:
    """The empty-prompt embedding ``[1, 77, width]`` (float32, CPU) of an SD text encoder.

    ``source`` may be:

    * a diffusers model folder (``text_encoder/config.json`` + ``model.safetensors``,
      ``pytorch_model.bin``, an fp16 variant or a sharded index), or a ``text_encoder``
      folder itself;
    * a single-file original SD2.x checkpoint (``.safetensors`` / ``.ckpt``) with
      ``cond_stage_model.model.*`` keys (penultimate layer + ``ln_final``, as SD2 does);
    * a file holding a Hugging Face ``CLIPTextModel`` state dict (``text_model.*``), using
      the ``config.json`` beside it when there is one.

    Raises:
        WeightsFileError: naming the file, when it is missing, damaged, or has no text
            encoder ("this checkpoint has no text encoder; ...").
    """
    src = Path(source)
    if src.is_dir():
        folder = src / "text_encoder" if (src / "text_encoder").is_dir() else src
        config_path = folder / "config.json"
        if not config_path.is_file():
            where = src / "text_encoder" if folder is src else folder
            raise WeightsFileError(
                where,
                "this model folder has no text encoder (expected text_encoder/config.json and "
                "its weights); " + _NO_TEXT_ENCODER.split("; ", 1)[1],
            )
        config = _read_json(config_path)
        state = _hf_folder_weights(folder)
        return _encode(state, config, folder)
    if not src.exists():
        raise WeightsFileError(src, "file not found")
    state = _read_text_weights(src)
    config = None
    sibling = src.parent / "config.json"
    if _openclip_prefix(state) is None and _hf_prefix(state) is not None and sibling.is_file():
        cfg = _read_json(sibling)
        if "clip" in str(cfg.get("model_type", "")) or "text_config" in cfg:
            config = cfg
    return _encode(state, config, src)
