"""What is trained: LoRA / DoRA adapters (peft) on the language model, or full fine-tuning; and merging.

Adapters are peft adapters over the whole *ForConditionalGeneration, so `PeftModel.from_pretrained` (and
`Embedder.from_pretrained(model, adapter=dir)`) applies them. Targets are the language model's linear
layers; the vision tower and projector are frozen unless train_vision, which adds their linear layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import profiles
from ..atomic import atomic_dir
from ..errors import InputError
from ..models.backbones import Backbone, load_backbone
from ..models.embedder import apply_adapter
from ..models.preprocessors import quiet_transformers
from .dropout import use_seeded_dropout


def target_modules(backbone: Backbone, *, train_vision: bool = False) -> list[str]:
    """Full names of the linear layers to adapt: the language model's, plus the vision tower's and projector's."""
    prefixes = (backbone.language_prefix, *(backbone.vision_prefixes if train_vision else ()))
    return [
        name
        for name, module in backbone.model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefixes)
    ]


def add_adapter(
    backbone: Backbone,
    *,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.1,
    dora: bool = False,
    train_vision: bool = False,
    init_b_std: float = 0.0,
) -> nn.Module:
    """Inject a LoRA (or DoRA) adapter into backbone.model in place; returns the peft model wrapping it.

    Only the adapter's weights are trainable afterwards. alpha defaults to 4 * r (VLM2Vec: r 16, alpha 64).
    The backbone's own forward runs through the adapted layers (peft swaps them in place). init_b_std > 0
    starts B at N(0, init_b_std) instead of peft's zeros, so that the adapter acts from the first step and
    every gradient is non-zero (gradient checks and benchmarks; training starts from zero).
    The LoRA dropout is a `SeededDropout` (training/dropout.py): on CPU its masks cost a sixth of torch's.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise InputError(f"LoRA rank must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if init_b_std < 0:
        raise InputError(f"init_b_std must be >= 0, got {init_b_std}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 4 * r,
        lora_dropout=dropout,
        use_dora=dora,
        target_modules=target_modules(backbone, train_vision=train_vision),
        bias="none",
    )
    with quiet_transformers():
        model = get_peft_model(backbone.model, config)
    use_seeded_dropout(model)
    if init_b_std > 0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=init_b_std)
    return model


def set_full_finetune(backbone: Backbone, *, train_vision: bool = False) -> None:
    """Train every weight of the language model (and of the vision tower and projector when train_vision)."""
    prefixes = (backbone.language_prefix, *(backbone.vision_prefixes if train_vision else ()))
    for name, p in backbone.model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a checkpoint stores and restores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy a `trainable_state` back into the model; InputError when the names or shapes do not match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise InputError(
            f"{where}: the checkpoint's parameters do not match the model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written with other training settings?"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise InputError(
                    f"{where}: parameter {n} has shape {tuple(state[n].shape)}, model {tuple(p.shape)}"
                )
            p.copy_(state[n])


def saved_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a model directory's config declares ("float32" when it declares none we support)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    for cfg in (config, config.get("text_config") or {}):
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        if dtype in ("float32", "float16", "bfloat16"):
            return dtype
    return "float32"


def merge_adapter(
    model: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    profile: str | None = None,
) -> Path:
    """Merge a peft adapter into the base model and write one complete HF-format model directory.

    The result (weights with the LM head, config, tokenizer, image processor configuration) loads wherever
    the base model does. dtype defaults to the base model's. Written atomically: a failed merge leaves
    nothing, and an existing `out` is replaced only when overwrite and only once the new one is complete.
    profile: the input recipe recorded in the result, which Embedder and build_engine then take by
    default (None: the adapter's record, else the base model's, else "vlm2vec").
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output directory {os.fspath(out)!r} already exists")
    profile = profiles.resolve(profile, adapter, model)
    backbone = load_backbone(model, dtype=dtype or saved_dtype(model), keep_lm_head=True)
    apply_adapter(backbone, adapter)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        backbone.model.save_pretrained(tmp)
        backbone.pre.save(tmp)
        profiles.write_record(tmp, profile)
    return out
