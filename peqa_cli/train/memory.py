"""Keep CPU training's resident memory close to what it actually uses.

PEQA's forward and backward build each layer's dequantized weight, use it and free it, some
hundred times per step. glibc's malloc raises its mmap threshold to the size of the largest
block freed so far (up to 32 MB), after which those multi-MB temporaries come from the heap
and the freed space stays resident: on SmolLM2 that is ~300 MB of RSS for nothing, more than
the packed model itself. Pinning the threshold sends every block >= 128 KiB to mmap, which
is returned to the OS on free (cost: a page-fault pass per temporary, negligible next to the
matmul that uses it). CUDA memory is unaffected; on non-glibc systems this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number
_done = False


def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold (disabling its dynamic growth); True when applied."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    log.debug("malloc mmap threshold pinned at %d bytes: %s", nbytes, ok)
    return ok
