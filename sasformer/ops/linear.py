"""Several linear maps of one input as one matmul, with the parameters left where they are.

``linear_split(x, q_proj, k_proj, v_proj)`` computes ``x @ cat(W_q, W_k, W_v).T`` and splits the
result: one GEMM with a wide output instead of three narrow ones (and one in each direction of the
backward), while every ``nn.Linear`` keeps its own weight, so parameter names, the state dict,
checkpoints and exports do not change. Concatenating the weights costs one small copy per call
(fused with the autocast cast under ``torch.compile``); a decoder, which reads every weight once per
token, keeps the concatenation instead (:func:`keep_concat`). The reference is :func:`linear_split_naive`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def concat_linear(*layers: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weights (sum of out_features, in_features) and biases of ``layers`` stacked as one linear map."""
    if not layers:
        raise ValueError("concat_linear needs at least one nn.Linear")
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("concatenated linear maps need all layers with a bias or all without one")
    weight = torch.cat([layer.weight for layer in layers])
    return weight, None if biases[0] is None else torch.cat(biases)


# where a kept concatenation lives: the first layer's __dict__ (not a registered buffer, so it is in no
# state dict and no parameter list)
_KEPT = "_kept_concat"


@dataclass
class KeptConcat:
    """The concatenated weight and bias of a group of linear maps, and the versions of the parts it was made from."""

    weight: Tensor
    bias: Tensor | None
    key: tuple


def version_key(tensors: Iterable[Tensor]) -> tuple:
    """Identity, storage, version counter, dtype and device of each tensor: a key that changes when any of
    them is edited in place or replaced (for operands derived from weights and kept between calls).
    Inference tensors carry no version counter: their storage is the only thing to compare."""
    return tuple((id(t), t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)
                 for t in tensors)


def _parts_key(layers: tuple[nn.Linear, ...]) -> tuple:
    return version_key(t for layer in layers for t in (layer.weight, layer.bias) if t is not None)


def keep_concat(*layers: nn.Linear) -> bool:
    """Keep the concatenation of ``layers``' weights for gradient-free calls of :func:`linear_fused` (and
    :func:`linear_split`), made now or refreshed in place when a part changed; True if new storage was
    allocated (a CUDA graph that read the old one must be captured again).

    Decoding a few tokens per call reads each weight once per step, so the copy :func:`linear_fused`
    makes otherwise (one concatenation per call) is as many bytes again; keeping it costs the memory of
    those weights once more. :func:`drop_concats` frees it."""
    kept: KeptConcat | None = layers[0].__dict__.get(_KEPT)
    key = _parts_key(layers)
    if kept is not None and kept.key == key:
        return False
    # normal tensors even under inference mode, so that a later refresh can write into them
    with torch.no_grad(), torch.inference_mode(False):
        weight, bias = concat_linear(*layers)
        fits = kept is not None and (kept.bias is None) == (bias is None) and all(
            (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device)
            for old, new in ((kept.weight, weight), (kept.bias, bias)) if new is not None)
        if fits:
            kept.weight.copy_(weight)
            if bias is not None:
                kept.bias.copy_(bias)
            kept.key = key
            return False
    layers[0].__dict__[_KEPT] = KeptConcat(weight, bias, key)
    return True


def fused_groups(model: nn.Module) -> list[tuple[nn.Linear, ...]]:
    """The groups of linear maps ``model``'s modules run through :func:`linear_fused` or :func:`linear_split`
    (each module lists its
    own in a ``fused_linear_groups()`` method)."""
    return [group for module in model.modules() if hasattr(module, "fused_linear_groups")
            for group in module.fused_linear_groups()]


def keep_concats(groups: list[tuple[nn.Linear, ...]]) -> bool:
    """:func:`keep_concat` for each group (see :func:`fused_groups`); True if any got new storage."""
    reallocated = False
    for group in groups:
        reallocated |= keep_concat(*group)
    return reallocated


def drop_concats(model: nn.Module) -> None:
    """Free every concatenation kept by :func:`keep_concat` in ``model``."""
    for module in model.modules():
        module.__dict__.pop(_KEPT, None)


def _kept(layers: tuple[nn.Linear, ...]) -> KeptConcat | None:
    kept: KeptConcat | None = layers[0].__dict__.get(_KEPT)
    if kept is None or torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        # the check is host-side: whoever compiled the step refreshes the concatenation before each call
        return kept
    keep_concat(*layers)
    return layers[0].__dict__[_KEPT]


def linear_fused(x: Tensor, *layers: nn.Linear) -> Tensor:
    """``torch.cat([layer(x) for layer in layers], -1)`` computed as one ``F.linear``.

    With gradients off and a concatenation kept by :func:`keep_concat`, that is used (refreshed first if a
    part changed, outside ``torch.compile``) instead of concatenating the weights again."""
    if len(layers) == 1:
        return layers[0](x)
    kept = _kept(layers) if layers else None
    weight, bias = (kept.weight, kept.bias) if kept is not None else concat_linear(*layers)
    return F.linear(x, weight, bias)


def linear_split(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` computed as one ``F.linear`` (:func:`linear_fused`); outputs
    are views of one buffer."""
    if len(layers) == 1:
        return (layers[0](x),)
    return linear_fused(x, *layers).split([layer.out_features for layer in layers], dim=-1)


def linear_split_naive(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """Reference of :func:`linear_split`: one matmul per layer."""
    return tuple(layer(x) for layer in layers)


def linear_fused_naive(x: Tensor, *layers: nn.Linear) -> Tensor:
    """Reference of :func:`linear_fused`: one matmul per layer, concatenated."""
    return torch.cat(linear_split_naive(x, *layers), dim=-1)
