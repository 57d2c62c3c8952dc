"""Running the Triton kernels on CPU: the Triton interpreter (TRITON_INTERPRET=1), even after triton was imported.

Triton picks compiled or interpreted mode when a function is decorated with @triton.jit, and reads
TRITON_INTERPRET then. Its own library functions (tl.max, tl.sum, tl.sort, ...) are decorated when
`triton.language` is first imported, and other packages import it early (peft does, through its quantisation
helpers). In a process that imported triton before TRITON_INTERPRET was set, an interpreted kernel calling
tl.max fails with "Cannot call @triton.jit'd outside of the scope of a kernel". `use_interpreter()` fixes
that state: it sets the variable, re-decorates the standard library in interpreted mode, and reloads our
kernel modules if they were decorated in compiled mode. It only ever runs where the interpreter is wanted
(CPU tensors with backend="triton"); on its own it is one-way for the process, so a process that launches
compiled kernels on a GPU should not also ask for the interpreter. `interpreter_mode()` is the reversible
form, for tests: it puts back everything use_interpreter() replaced when its block ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

_KERNEL_MODULES = ("vlm2vec_rt.kernels.infonce", "vlm2vec_rt.kernels.topk")


def interpreter_requested() -> bool:
    """Whether the environment asks for the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_interpreter() -> None:
    """Put Triton in interpreter mode for this process, whatever was imported before."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not _interpreted(tl.max, JITFunction, InterpretedFunction):
        standard = importlib.reload(tl.standard)
        for name, fn in vars(standard).items():
            if isinstance(fn, InterpretedFunction) and isinstance(getattr(tl, name, None), JITFunction):
                setattr(tl, name, fn)
    for name in _KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None and not _interpreted(module.KERNELS[0], JITFunction, InterpretedFunction):
            importlib.reload(module)


@contextlib.contextmanager
def interpreter_mode() -> Iterator[None]:
    """use_interpreter() for a block (a test module, say), undone on exit.

    Everything use_interpreter() replaces is put back: TRITON_INTERPRET, triton.language's standard library
    (the module and the names triton.language re-exports from it) and our kernel modules (their namespaces
    restored in place, so functions imported from them see the original kernels again; a kernel module first
    imported inside the block is forgotten, to be imported afresh in the mode of the day).
    """
    before = os.environ.get("TRITON_INTERPRET")
    import triton.language as tl  # imported (and decorated) in the mode the environment gives, not ours

    tl_names = dict(vars(tl))
    standard = dict(vars(tl.standard))
    kernels = {
        name: (sys.modules[name], dict(vars(sys.modules[name])))
        for name in _KERNEL_MODULES
        if name in sys.modules
    }
    use_interpreter()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        _restore_namespace(tl.standard, standard)
        for name, value in tl_names.items():
            if getattr(tl, name, None) is not value:
                setattr(tl, name, value)
        for name in _KERNEL_MODULES:
            if name in kernels:
                module, namespace = kernels[name]
                _restore_namespace(module, namespace)
                sys.modules[name] = module
            elif sys.modules.pop(name, None) is not None:
                package, _, attr = name.rpartition(".")
                if hasattr(sys.modules.get(package), attr):
                    delattr(sys.modules[package], attr)


def _restore_namespace(module: object, saved: dict) -> None:
    """Put a module's globals back as they were (in place: its functions keep seeing them)."""
    namespace = vars(module)
    for name in [name for name in namespace if name not in saved]:
        del namespace[name]
    namespace.update(saved)


def _interpreted(fn: object, jit_type: type, interpreted_type: type) -> bool:
    return isinstance(fn, interpreted_type) or not isinstance(fn, jit_type)
