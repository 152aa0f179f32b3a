"""Hugging Face ``transformers`` integration (optional extra ``hf``).

:func:`register` makes ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` know
``model_type="sasformer"``, so a saved model loads with ``AutoModelForCausalLM.from_pretrained(path)``
and no ``trust_remote_code``. It is idempotent and returns False (doing nothing) when transformers
is not installed; the classes are imported on first use, so importing this package is free.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SASFormerConfig": "sasformer.models.hf.configuration_sasformer",
    "SASFormerCache": "sasformer.models.hf.modeling_sasformer",
    "SASFormerModel": "sasformer.models.hf.modeling_sasformer",
    "SASFormerForCausalLM": "sasformer.models.hf.modeling_sasformer",
    "SASFormerPreTrainedModel": "sasformer.models.hf.modeling_sasformer",
}
_registered = False


def register() -> bool:
    """Register the sasformer classes with the transformers Auto classes (once); False without transformers."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:
        return False

    from sasformer.models.hf.configuration_sasformer import SASFormerConfig
    from sasformer.models.hf.modeling_sasformer import SASFormerForCausalLM, SASFormerModel

    AutoConfig.register(SASFormerConfig.model_type, SASFormerConfig, exist_ok=True)
    AutoModel.register(SASFormerConfig, SASFormerModel, exist_ok=True)
    AutoModelForCausalLM.register(SASFormerConfig, SASFormerForCausalLM, exist_ok=True)
    _registered = True
    return True


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SASFormerCache",
    "SASFormerConfig",
    "SASFormerForCausalLM",
    "SASFormerModel",
    "SASFormerPreTrainedModel",
    "register",
]
