"""Engines: a merged model exported to two graphs, compiled by a backend, and served by `Engine`.

- export.py: the vision and decoder graphs as torch modules; ONNX / torch.export.
- ort.py, trt.py, aoti.py: one module per backend, building the graphs and running them (Runner).
- backends.py: backends by name, their availability, what "auto" picks.
- host.py: what runs between the graphs without the torch model (embedding, pack, positions).
- manifest.py: manifest.json (format version, parity report, sha256 of every file).
- parity.py: the gate every build passes against eager fp32.
- build.py: build_engine. runtime.py: Engine.
"""

from .build import build_engine
from .runtime import Engine

__all__ = ["Engine", "build_engine"]
