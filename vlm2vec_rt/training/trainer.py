"""The training loop: MMEB-train data -> GradCache steps on a LoRA/DoRA (or fully fine-tuned) backbone.

One process, or one per device under torchrun (torch.distributed: gloo on CPU, NCCL on GPU). Every rank
draws the same global batch from the sampler and encodes its own slice; negatives are gathered across
ranks inside the loss. AdamW with linear warm-up and linear decay, gradient clipping, bf16 autocast around
the encoder on GPUs. Checkpoints every `checkpoint_every` steps; `resume=True` continues from the newest
one so that the run reaches the same parameters as an uninterrupted one.

    out/train_config.json      the settings (a resumed run must match them); written just before the first
                               step, so a run that fails to start leaves nothing behind
    out/train_log.jsonl        one line per step: loss, learning rate, throughput
    out/checkpoints/step-N/    see checkpoint.py
    out/adapter/               the final peft adapter (LoRA/DoRA), or out/model/ (full fine-tuning)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import atomic, distributed, profiles
from ..errors import InputError
from ..models.backbones import Backbone, load_backbone
from ..preprocess.images import DEFAULT_MAX_PIXELS
from ..preprocess.items import Item
from ..progress import progress_bar
from . import checkpoint as ckpt
from .data import DistinctTargetSampler, Example, read_train_data
from .grad_cache import grad_cache_step
from .lora import add_adapter, load_trainable_state, set_full_finetune, trainable_state
from .rng import rng_state, set_rng_state

log = logging.getLogger("vlm2vec_rt.training")

CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Every setting of a run. Those in EXACT_RESUME_KEYS must be equal for a run to be resumed."""

    model_dir: str
    data_dir: str
    out_dir: str
    datasets: list[str] | None = None
    split: str = "original"
    image_root: str | None = None
    lora_r: int = 16
    lora_alpha: float | None = None  # 4 * lora_r
    lora_dropout: float = 0.1
    dora: bool = False
    full_finetune: bool = False
    train_vision: bool = False
    batch_size: int = 64  # global: over all ranks (a dataset with few distinct targets gets smaller batches)
    gc_chunk: int = 4
    steps: int = 100
    temperature: float = 0.02
    lr: float = 2e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between INFO log lines (every step goes to train_log.jsonl)
    device: str = "cpu"
    bf16: bool | None = None  # None: on CUDA devices
    image_resolution: str | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # images over this are refused (decompression-bomb guard)
    profile: str = profiles.DEFAULT_PROFILE  # the input recipe trained on, recorded beside the result

    def check(self, world: int) -> None:
        positive = ("batch_size", "gc_chunk", "steps", "checkpoint_every", "keep_checkpoints", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise InputError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.batch_size < world:
            raise InputError(f"batch size {self.batch_size} is smaller than the {world} ranks")
        # NaN passes every comparison but ==, so each number is checked to be finite first
        numbers = {
            "lr": (self.lr, "> 0", lambda v: v > 0),
            "temperature": (self.temperature, "> 0", lambda v: v > 0),
            "weight_decay": (self.weight_decay, ">= 0", lambda v: v >= 0),
            "max_grad_norm": (self.max_grad_norm, ">= 0 (0: no clipping)", lambda v: v >= 0),
            "lora_dropout": (self.lora_dropout, "in [0, 1)", lambda v: 0 <= v < 1),
            "lora_alpha": (self.lora_alpha, "> 0", lambda v: v is None or v > 0),
        }
        for key, (value, rule, ok) in numbers.items():
            try:
                finite = value is None or math.isfinite(value)
            except TypeError:  # not a number at all
                finite = False
            if not finite or not ok(value):
                raise InputError(f"{key.replace('_', '-')} must be a finite number {rule}, got {value!r}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise InputError(f"warmup steps must be in [0, steps], got {self.warmup_steps}")
        if self.max_image_pixels < 1:
            raise InputError(f"max-image-pixels must be >= 1, got {self.max_image_pixels}")
        profiles.check_profile(self.profile)


# What a resumed run must share with the one it continues (the rest, like device or paths, may change).
EXACT_RESUME_KEYS = (
    "datasets", "split", "lora_r", "lora_alpha", "lora_dropout", "dora", "full_finetune", "train_vision",
    "batch_size", "gc_chunk", "steps", "temperature", "lr", "warmup_steps", "weight_decay",
    "max_grad_norm", "seed", "image_resolution", "profile",
)  # fmt: skip


class EmbeddingModel(nn.Module):
    """The backbone's forward (Batch -> L2-normalised embeddings) as one module, so DDP can wrap it."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # registers the (adapted) parameters

    def forward(self, batch) -> torch.Tensor:
        return self.backbone.forward(batch)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up from 0 over warmup_steps, then linear decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def make_encoder(
    backbone: Backbone, module: nn.Module, *, bf16: bool
) -> Callable[[Sequence[tuple[Item, str]]], torch.Tensor]:
    """encode((item, where) chunk) -> embeddings: preprocessing per chunk (bounded memory), errors naming
    the file and row, the model under bf16 autocast when asked."""
    pre = backbone.pre
    device_type = backbone.device.type

    def encode(chunk: Sequence[tuple[Item, str]]) -> torch.Tensor:
        prepared = []
        for item, where in chunk:
            try:
                prepared.append(pre.prepare(item, what=where))
            except InputError as e:
                msg = str(e)
                raise InputError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        batch = backbone.to_device(pre.collate(prepared))
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            return module(batch)

    return encode


def train(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **settings: Any,
) -> Path:
    """Train and return the final adapter directory (out/adapter), or out/model with full fine-tuning.

    settings: any TrainConfig field (lora_r, batch_size, gc_chunk, steps, temperature, lr, ...).
    callback(step, metrics) runs after every step on every rank (metrics: loss, lr, examples_per_s).
    Bad data stops the run with InputError before the first step.
    """
    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training setting(s): {sorted(unknown)}")
    cfg = TrainConfig(
        model_dir=os.fspath(model_dir), data_dir=os.fspath(data_dir), out_dir=os.fspath(out_dir), **settings
    )
    # Under torchrun: join the job, and leave it as we found it once _train's frame (and the DDP wrapper
    # holding the group) is gone.
    with distributed.joined(cfg.device) as cfg.device:
        return _train(cfg, resume=resume, progress=progress, callback=callback)


def _train(cfg: TrainConfig, *, resume: bool, progress: bool, callback) -> Path:
    world, rank = distributed.world_size(), distributed.rank()
    cfg.check(world)
    # Data first: a bad row stops the run before anything is loaded or written.
    data = read_train_data(cfg.data_dir, datasets=cfg.datasets, split=cfg.split, image_root=cfg.image_root)
    sampler = DistinctTargetSampler(
        [e.target for e in data.examples],
        cfg.batch_size,
        datasets=data.dataset_names(),
        seed=cfg.seed,
        min_batch=world,
    )
    if rank == 0:
        log.info("training data: %d examples from %s", len(data), data.datasets)
        for plan in sampler.plans:
            if plan.limited:
                log.warning(
                    "dataset %s: batches of %s rows, not %d: it has %d distinct targets, the most frequent on "
                    "%d of its %d rows (a target twice in a batch would be a false negative)",
                    plan.name, plan.sizes_text, cfg.batch_size, plan.distinct_targets, plan.largest_target,
                    plan.rows,
                )  # fmt: skip
    out = Path(cfg.out_dir)
    continuing = _check_out_dir(out, cfg, resume=resume)  # nothing is written until the first step can run

    backbone, peft_model = _load_model(cfg)
    module: nn.Module = EmbeddingModel(backbone)
    no_sync = None
    if world > 1:
        # No buffer sync per forward: the buffers (rotary tables) are constants; with train_vision the
        # vision tower sits unused in text-only chunks.
        module = nn.parallel.DistributedDataParallel(
            module, forward_sync_buffers=False, find_unused_parameters=cfg.train_vision
        )
        no_sync = module.no_sync
    bf16 = cfg.bf16 if cfg.bf16 is not None else backbone.device.type == "cuda"
    encode = make_encoder(backbone, module, bf16=bf16)

    params = [p for p in backbone.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(cfg.warmup_steps, cfg.steps))

    step, epoch, batch_index = 0, 0, 0
    last = ckpt.latest_checkpoint(out) if resume else None
    if last is not None:
        state = ckpt.load_checkpoint(last, device=backbone.device)
        load_trainable_state(backbone.model, state.trainable, os.fspath(last))
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if len(state.rng) != world:
            raise InputError(f"{last}: written by {len(state.rng)} ranks, resumed with {world}")
        set_rng_state(state.rng[rank])
        step, epoch, batch_index = state.step, state.epoch, state.batch_index
        log.info("resumed from %s (step %d)", last, step)
        if rank == 0:
            _truncate_log(out / LOG_FILE, step)
    elif resume:
        log.info("no checkpoint in %s: starting from step 0", out)
    if rank == 0 and not continuing:
        # A fresh run: its settings, and a log of its own (a leftover of a run that never checkpointed goes).
        atomic.write_json(out / CONFIG_FILE, dataclasses.asdict(cfg))
        atomic.write_bytes(out / LOG_FILE, b"")

    bar = progress_bar(cfg.steps, initial=step, enabled=progress and rank == 0, desc="train", unit="step")
    backbone.model.train()  # dropout (LoRA dropout included) on
    loss = float("nan")
    logged_epoch = None
    while step < cfg.steps:
        indices, epoch, batch_index = sampler.batch_at(epoch, batch_index)
        if rank == 0 and epoch != logged_epoch:  # each dataset's share of the epoch's rows and steps
            log.info("epoch %d: %s", epoch, sampler.describe())
            logged_epoch = epoch
        # Each rank its share (the sampler guarantees one row or more per rank).
        examples = [data.examples[i] for i in np.array_split(indices, world)[rank]]
        queries, targets, negatives = _sides(examples)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = grad_cache_step(
            encode,
            queries,
            targets,
            negatives=negatives,
            chunk_size=cfg.gc_chunk,
            temperature=cfg.temperature,
            no_sync=no_sync,
        )
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - started
        metrics = {"loss": loss, "lr": lr, "examples_per_s": len(indices) / seconds}
        if rank == 0:
            _log_step(out, step, metrics, info=step % cfg.log_every == 0 or step == cfg.steps)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{metrics['examples_per_s']:.1f}")
            bar.update(1)
        if callback is not None:
            callback(step, metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(out, cfg, step, backbone, peft_model, optimizer, scheduler, epoch, batch_index, loss, rank)
    bar.close()
    return _save_final(out, cfg, backbone, peft_model, rank)


def _sides(examples: list[Example]):
    queries = [(e.query, f"{e.source} (query)") for e in examples]
    targets = [(e.positive, f"{e.source} (positive)") for e in examples]
    negatives = [(e.negative, f"{e.source} (negative)") for e in examples if e.negative is not None]
    return queries, targets, negatives


def _load_model(cfg: TrainConfig) -> tuple[Backbone, nn.Module | None]:
    """The backbone made trainable, and the peft model wrapping it (None with full fine-tuning)."""
    backbone = load_backbone(
        cfg.model_dir,
        device=cfg.device,
        dtype="float32",
        keep_lm_head=cfg.full_finetune,  # a fully fine-tuned model is saved whole
        image_resolution=cfg.image_resolution,
        max_image_pixels=cfg.max_image_pixels,
        profile=cfg.profile,
    )
    torch.manual_seed(cfg.seed)  # adapter initialisation
    peft_model = None
    if cfg.full_finetune:
        set_full_finetune(backbone, train_vision=cfg.train_vision)
    else:
        peft_model = add_adapter(
            backbone,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            dora=cfg.dora,
            train_vision=cfg.train_vision,
        )
    if not any(p.requires_grad for p in backbone.model.parameters()):
        raise InputError("nothing to train: no parameter requires a gradient")
    return backbone, peft_model


def _check_out_dir(out: Path, cfg: TrainConfig, *, resume: bool) -> bool:
    """True when out holds a run to continue (resume=True, same settings); False when this run starts afresh;
    InputError when out holds a run this one must not touch.

    A run is its checkpoints or its final adapter/model. A train_config.json (and log) alone is what a run
    left that stopped before its first checkpoint: there is nothing to continue, and a new run replaces it.
    """
    held = ckpt.list_checkpoints(out) or any((out / name).exists() for name in ("adapter", "model"))
    if not held:
        return False
    if not resume:
        raise InputError(
            f"{os.fspath(out)!r} already holds a training run: pass --resume to continue it, or choose a new --out"
        )
    saved = out / CONFIG_FILE
    try:
        before = json.loads(saved.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{os.fspath(out)!r} holds a training run but no {CONFIG_FILE}: its settings are unknown, so it "
            f"cannot be resumed; choose a new --out"
        ) from None
    except json.JSONDecodeError as e:
        raise InputError(f"{saved}: not valid JSON ({e})") from None
    now = dataclasses.asdict(cfg)
    changed = [k for k in EXACT_RESUME_KEYS if before.get(k) != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise InputError(f"cannot resume the run in {os.fspath(out)!r} with other settings ({detail})")
    return True


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps 1..step: those after it (and a line cut short by a kill) came from the
    interrupted run past its last checkpoint, and the resumed run logs those steps again."""
    if not path.is_file():
        return
    kept: dict[int, bytes] = {}
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(logged, int) and 0 < logged <= step and line.endswith(b"\n"):
            kept[logged] = line  # one line a step: the last one written
    atomic.write_bytes(path, b"".join(kept[k] for k in sorted(kept)))


def _log_step(out: Path, step: int, metrics: dict[str, float], *, info: bool) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    log.log(
        logging.INFO if info else logging.DEBUG,
        "step %d: loss %.4f, lr %.3g, %.1f examples/s",
        step,
        metrics["loss"],
        metrics["lr"],
        metrics["examples_per_s"],
    )


def _save(out, cfg, step, backbone, peft_model, optimizer, scheduler, epoch, batch_index, loss, rank) -> None:
    rng = rng_state()
    if distributed.world_size() > 1:
        import torch.distributed as dist

        states: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(states, rng)
    else:
        states = [rng]
    if rank == 0:
        ckpt.save_checkpoint(
            out,
            step,
            trainable=trainable_state(backbone.model),
            optimizer=optimizer,
            scheduler=scheduler,
            rng=states,
            epoch=epoch,
            batch_index=batch_index,
            loss=loss,
            keep=cfg.keep_checkpoints,
            adapter=peft_model,
        )
    distributed.barrier()


def _save_final(out: Path, cfg: TrainConfig, backbone: Backbone, peft_model, rank: int) -> Path:
    """out/adapter (peft format) or, with full fine-tuning, out/model (a complete HF-format model)."""
    target = out / ("model" if cfg.full_finetune else "adapter")
    if rank == 0:
        with atomic.atomic_dir(target, overwrite=True) as tmp:
            if cfg.full_finetune:
                backbone.model.save_pretrained(tmp)
                backbone.pre.save(tmp)
            else:
                peft_model.save_pretrained(tmp)
            profiles.write_record(tmp, cfg.profile)  # what Embedder, build and merge take by default
    distributed.barrier()
    return target
