"""The fixed text condition the discriminator's trunk sees (no text encoder while training)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# SDXL micro-conditioning (original_size, crop_top_left, target_size): the pipeline defaults.
DEFAULT_SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


# --------------------------------------------------------------------------- condition


@dataclass
class DiscriminatorCondition:
    """The fixed condition the trunk sees (batch 1; expanded to the batch in forward).

    Attributes:
        encoder_hidden_states: ``[1, 77, C]`` (SDXL 2048, SD2.1 1024).
        text_embeds: SDXL pooled text embedding ``[1, 1280]``; ``None`` for SD2.1.
        time_ids: SDXL size conditioning ``[1, 6]``; ``None`` for SD2.1.
    """

    encoder_hidden_states: Tensor
    text_embeds: Tensor | None = None
    time_ids: Tensor | None = None


def zero_condition(
    unet_config: dict, sequence_length: int = 77, time_ids: Sequence[float] = DEFAULT_SDXL_TIME_IDS
) -> DiscriminatorCondition:
    """An all-zero text condition (SDXL's ``force_zeros_for_empty_prompt`` style) with real
    size ``time_ids``; needs no text encoder."""
    context = torch.zeros(1, sequence_length, unet_config["cross_attention_dim"])
    if unet_config.get("addition_embed_type") != "text_time":
        return DiscriminatorCondition(context)
    ids = torch.tensor([list(time_ids)], dtype=torch.float32)
    pooled = (
        unet_config["projection_class_embeddings_input_dim"]
        - ids.shape[1] * unet_config["addition_time_embed_dim"]
    )
    return DiscriminatorCondition(context, torch.zeros(1, pooled), ids)


@torch.no_grad()
def encode_condition(
    tokenizers: Sequence,
    text_encoders: Sequence[nn.Module],
    prompt: str = "",
    time_ids: Sequence[float] = DEFAULT_SDXL_TIME_IDS,
) -> DiscriminatorCondition:
    """Encode a prompt (default: empty) once, as the diffusers pipelines do.

    One encoder (SD2.1): ``context = text_encoder(ids)[0]`` (last hidden state). Two (SDXL,
    ``CLIPTextModel`` + ``CLIPTextModelWithProjection``): ``context`` = both encoders'
    penultimate hidden states concatenated (768 + 1280 = 2048), ``text_embeds`` = the second
    encoder's projected pooled output, plus ``time_ids``.

    Args:
        tokenizers: callables like transformers tokenizers (``model_max_length``, ``input_ids``).
    """
    if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
        raise ValueError("pass one (SD2.1) or two (SDXL) tokenizers and text encoders")

    def ids(tok, enc):
        device = next(enc.parameters()).device
        out = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return out.input_ids.to(device)

    if len(text_encoders) == 1:
        tok, enc = tokenizers[0], text_encoders[0]
        return DiscriminatorCondition(enc(ids(tok, enc))[0].float().cpu())
    contexts = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        out = enc(ids(tok, enc), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output ("text_embeds")
        contexts.append(out.hidden_states[-2])
    context = torch.cat(contexts, dim=-1)
    ids_t = torch.tensor([list(time_ids)], dtype=torch.float32)
    return DiscriminatorCondition(context.float().cpu(), pooled.float().cpu(), ids_t)
