"""Backbones (LLaVA-NeXT, Qwen2-VL), the Embedder, and the tiny-model factory."""

from .backbones import Backbone, load_backbone
from .preprocessors import Preprocessor, load_preprocessor
from .tiny import make_tiny_model

__all__ = ["Backbone", "Preprocessor", "load_backbone", "load_preprocessor", "make_tiny_model"]
