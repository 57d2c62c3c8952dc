"""Host-side steps of an engine: what runs around and between its two graphs, in numpy, without the torch model.

    NumpyBatch --vision_feeds--> vision graph calls --pack--> per-image features
    input_ids + per-image features --inputs_embeds (embedding table, image slots)--> decoder graph
    attention_mask (+ ids, grids) --position_ids--> decoder graph

The only weights this side needs are the token embedding table and a backbone's own few (LLaVA-NeXT's
image_newline), stored as .npy files in the engine; the rest is arithmetic on the model config. The `Host`
base and the shared steps are in backbones/base.py, each backbone's Host subclass in its module.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..backbones import REGISTRY
from ..backbones.base import EMBED_TOKENS, Host

# A backbone name -> its engine host side.
HOSTS: dict[str, type[Host]] = {name: e.host for name, e in REGISTRY.items()}


def write_host_assets(backbone, out_dir: str | os.PathLike, *, dtype: str = "float32") -> list[str]:
    """Save the weights the host side needs (embedding table, the backbone's own) as .npy; returns the names."""
    from .. import atomic

    out_dir = Path(out_dir)
    tensors = {EMBED_TOKENS: backbone.inner.get_input_embeddings().weight, **backbone.host_assets()}
    for name, tensor in tensors.items():
        atomic.save_npy(out_dir / name, tensor.detach().float().cpu().numpy().astype(dtype))
    return list(tensors)
