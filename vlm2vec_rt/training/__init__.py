"""Contrastive training (the VLM2Vec recipe): InfoNCE with in-batch and hard negatives, GradCache, LoRA/DoRA
adapters merged into one HF-format model, torch.distributed, checkpoints that resume exactly.

    grad_cache.py   grad_cache_step and the (distributed) contrastive loss
    data.py         MMEB-train reader, the sampler (one dataset a batch, equal targets kept apart)
    lora.py         adapter set-up (peft), full fine-tuning, merge_adapter
    rng.py          torch RNG state capture/restore (dropout replay, checkpoints)
    checkpoint.py   atomic checkpoints
    trainer.py      the loop (`vlm2vec-rt train`)
(torch.distributed plumbing, the all-gather with the local slice kept live included: vlm2vec_rt/distributed.py)
"""

from .grad_cache import grad_cache_step

__all__ = ["grad_cache_step"]
