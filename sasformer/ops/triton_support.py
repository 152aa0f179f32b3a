"""Whether Triton can be imported, looked up once at import: a plain constant, which ``torch.compile``
traces without calling anything."""

from __future__ import annotations

import importlib.util

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
