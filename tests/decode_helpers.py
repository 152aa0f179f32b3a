"""What the decoding tests share: tiny models, token ids, cached and static decoding, and a recorder
for the graphs a compiled decode step traces (the SAS decode path's calls: tests/layers/conftest.py)."""

from __future__ import annotations

import torch

from sasformer.generation import StaticDecoder
from sasformer.layers.sas_decode import set_decode_path
from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM


def tiny_model(attention: str, args: dict, *, vocab: int, n_layers: int = 2, max_seq_len: int = 64,
               seed: int = 0) -> DecoderLM:
    """An eval-mode model of width 24 with the SAS decode path on (``"auto"`` takes it on CUDA only)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, d_model=24, n_layers=n_layers, max_seq_len=max_seq_len,
                         attention=attention, attention_args=dict(args), init_std=0.1)
    model = DecoderLM(config).eval()
    set_decode_path(model, "on")
    return model


def token_ids(B: int, T: int, *, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_logits(model: DecoderLM, tokens: torch.Tensor, pieces: list[int], preallocate: bool = True) -> torch.Tensor:
    """Logits of ``tokens`` fed through one KV cache in pieces of the given lengths."""
    cache = model.new_cache(tokens.shape[1] if preallocate else None)
    out, start = [], 0
    for n in pieces:
        out.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    return torch.cat(out, dim=1)


def run_static(decoder: StaticDecoder, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens, then decode the rest one at a time; logits (B, T - prompt + 1, V)."""
    out = [decoder.prefill(tokens[:, :prompt])]
    for t in range(prompt, tokens.shape[1]):
        out.append(decoder.step(tokens[:, t : t + 1]).clone())
    return torch.stack(out, dim=1)


def trace_step(decoder: StaticDecoder) -> list[torch.fx.GraphModule]:
    """Compile ``decoder``'s step with dynamo alone (no inductor) and return the list that collects
    every graph it traces."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    decoder._step_fn = torch.compile(type(decoder)._step, backend=record, fullgraph=True, dynamic=False)
    return graphs


def record_launches(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    """Every launch of the fused simulation kernels from now on, as (kernel name, grid)."""
    from sasformer.ops.simulate import fused

    calls: list[tuple[str, tuple[int, ...]]] = []
    launch = fused._launch

    def recording(kernel, grid, *args, **meta):
        calls.append((kernel.fn.__name__, grid))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(fused, "_launch", recording)
    return calls

