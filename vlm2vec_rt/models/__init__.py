"""Backbones (LLaVA-NeXT, Qwen2-VL), the Embedder, and the tiny-model factory."""

from .backbones import Backbone, load_backbone
from .tiny import make_tiny_model

__all__ = ["Backbone", "load_backbone", "make_tiny_model"]
