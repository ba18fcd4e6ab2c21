"""Loading a program without the cyclic garbage collector's repeated passes."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused_while_loading() -> Iterator[None]:
    """Run the block (imports, model loading) with the cyclic garbage collector off, then
    freeze every object alive (``gc.freeze``) and resume it.

    Start-up builds some 300k objects that live as long as the process (torch's modules, the
    server's schemas, the model); while they pile up the collector scans them again and again,
    a tenth of start-up's CPU time. Frozen, they are skipped by every later collection too, so
    serving has no full pass over them. The price: the ~1.5 MB of cyclic garbage that importing
    leaves behind (closures, frames; no tensors) is frozen with them instead of freed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
