"""The compiled fast paths (``pigeon._fastring``, built from ``_fastring.c`` where a C
compiler is found), or None: pure Python, the same behaviour and the reference. Set
``PIGEON_PURE_PYTHON=1`` to force the pure-Python path (the tests run both)."""

from __future__ import annotations

import logging
import os
from typing import Any


def load_c_path(logger: str = "pigeon", what: str = "the C fast path") -> Any:
    """``pigeon._fastring``, or None where it is not built (said once, at debug level, on
    ``logger``) or ``PIGEON_PURE_PYTHON`` is set."""
    if os.environ.get("PIGEON_PURE_PYTHON"):
        return None
    try:
        from pigeon import _fastring  # type: ignore[attr-defined]
    except ImportError:
        logging.getLogger(logger).debug("%s is not built here; using the pure-Python path", what)
        return None
    return _fastring
