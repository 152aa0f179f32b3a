"""The floor of the MHA training step: its GEMMs and its attention, each timed alone at the step's shapes.

    python3 benchmarks/step_floor.py --out DIR [--size small] [--batch-size 64] [--loss-chunk-size 65536]

For one step of ``batch_size x seq_len`` tokens of the preset with MHA (bf16 on CUDA, fp32 on the CPU),
times every GEMM of one layer as the trainer runs it (the fused Q/K/V projection, the output projection,
the fused SwiGLU gate/up and the down projection: forward, input gradient, weight gradient), the LM
head's three GEMMs per loss chunk (logits, hidden-state gradient, weight gradient accumulated in fp32 as
``ops/cross_entropy/fused.py`` does) and causal attention forward + backward through the library's
``attend``. Their sum over the model is the step a GPU would run if nothing else did: no normalisation,
RoPE, gating, residual adds, softmax of the loss or optimiser. The MFU of that floor is the most any
step built on these GEMMs and this attention kernel can reach; the report says how much time a target
MFU leaves for everything else. A large device copy gives the memory bandwidth those other passes run
against. Writes ``step_floor.json`` and ``step_floor.md``.

Each piece is the median of single calls, each between its own pair of events, on fresh random inputs: a little
slower than the same kernels back to back inside a step (run 21: 89.0 ms for the pieces alone at batch 64, 86.6 ms
for the same GEMMs and attention in the profiled step), so the floor is an estimate from above.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_ms  # noqa: E402
from sasformer.models.flops import train_flops_per_token  # noqa: E402
from sasformer.models.presets import preset  # noqa: E402
from sasformer.ops.attention import attend  # noqa: E402
from sasformer.ops.cross_entropy.fused import accumulate_weight_grad_  # noqa: E402
from sasformer.train.metrics import peak_tflops  # noqa: E402


@dataclass
class Row:
    name: str
    shape: str  # M x K x N of the product, or the attention's B x H x T x D
    calls: int  # per step
    ms: float  # per call
    flops: float  # per call (attention: dense count, as the MFU convention counts it)

    @property
    def ms_per_step(self) -> float:
        return self.ms * self.calls

    @property
    def tflops(self) -> float:
        return self.flops / self.ms / 1e9


def randn(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)  # never zeros: they can run faster than data


def linear_rows(tokens: int, d_in: int, d_out: int, name: str, calls: int, time: Callable, dev, dtype) -> list[Row]:
    """Forward, input gradient and weight gradient of ``F.linear`` with an (out, in) weight."""
    x, w, dy = randn(tokens, d_in, device=dev, dtype=dtype), randn(d_out, d_in, device=dev, dtype=dtype), \
        randn(tokens, d_out, device=dev, dtype=dtype)
    flops = 2.0 * tokens * d_in * d_out
    return [
        Row(f"{name} forward", f"{tokens}x{d_in}x{d_out}", calls, time(lambda: x @ w.T), flops),
        Row(f"{name} input grad", f"{tokens}x{d_out}x{d_in}", calls, time(lambda: dy @ w), flops),
        Row(f"{name} weight grad", f"{d_out}x{tokens}x{d_in}", calls, time(lambda: dy.T @ x), flops),
    ]


def head_rows(tokens: int, chunk: int, d: int, vocab: int, time: Callable, dev, dtype) -> list[Row]:
    """The LM head's GEMMs per loss chunk, as the fused cross-entropy runs them (a shorter last chunk when the
    chunk does not divide the tokens is timed at its own size)."""
    chunk = min(chunk, tokens)
    sizes = {chunk: tokens // chunk, **({tokens % chunk: 1} if tokens % chunk else {})}
    return [row for size, calls in sizes.items() for row in head_chunk_rows(size, calls, d, vocab, time, dev, dtype)]


def head_chunk_rows(size: int, calls: int, d: int, vocab: int, time: Callable, dev, dtype) -> list[Row]:
    h, w = randn(size, d, device=dev, dtype=dtype), randn(vocab, d, device=dev, dtype=dtype)
    g = randn(size, vocab, device=dev, dtype=dtype)
    grad_w = torch.zeros(vocab, d, device=dev, dtype=torch.float32)
    flops = 2.0 * size * d * vocab
    return [
        Row("LM head logits", f"{size}x{d}x{vocab}", calls, time(lambda: h @ w.T), flops),
        Row("LM head hidden grad", f"{size}x{vocab}x{d}", calls, time(lambda: g @ w), flops),
        Row("LM head weight grad (fp32 accumulator)", f"{vocab}x{size}x{d}", calls,
            time(lambda: accumulate_weight_grad_(grad_w, g, h)), flops),
    ]


def attention_row(batch: int, heads: int, seq_len: int, head_dim: int, calls: int, time: Callable, dev,
                  dtype) -> Row:
    q, k, v = (randn(batch, heads, seq_len, head_dim, device=dev, dtype=dtype).requires_grad_() for _ in range(3))
    grad = randn(batch, heads, seq_len, head_dim, device=dev, dtype=dtype)

    def forward_backward() -> None:
        out = attend(q, k, v, None)
        torch.autograd.grad(out, (q, k, v), grad)

    # dense convention (models/flops.py): QK^T and PV over all T keys, forward + 2x for the backward
    flops = 3 * 2.0 * batch * heads * seq_len * seq_len * 2 * head_dim
    return Row("attention forward + backward (causal)", f"{batch}x{heads}x{seq_len}x{head_dim}", calls,
               time(forward_backward), flops)


def copy_bandwidth(time: Callable, dev, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and written."""
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / time(lambda: dst.copy_(src)) / 1e6


def measure(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = preset(args.size, "mha")
    d, hidden, L, vocab = config.d_model, config.mlp_hidden, config.n_layers, config.vocab_size
    attn_args = config.resolved_attention_args()
    heads, head_dim = attn_args.n_heads, attn_args.head_dim
    inner = heads * head_dim
    tokens = args.batch_size * args.seq_len

    def time(call: Callable[[], object]) -> float:
        for _ in range(args.warmup):
            call()
        return median_ms(call, args.reps, cuda)

    rows = [
        *linear_rows(tokens, d, 3 * inner, "Q/K/V projection", L, time, dev, dtype),
        *linear_rows(tokens, inner, d, "output projection", L, time, dev, dtype),
        *linear_rows(tokens, d, 2 * hidden, "SwiGLU gate/up", L, time, dev, dtype),
        *linear_rows(tokens, hidden, d, "SwiGLU down", L, time, dev, dtype),
        *head_rows(tokens, args.loss_chunk_size, d, vocab, time, dev, dtype),
        attention_row(args.batch_size, heads, args.seq_len, head_dim, L, time, dev, dtype),
    ]
    step_flops = train_flops_per_token(config, args.seq_len) * tokens
    floor_ms = sum(r.ms_per_step for r in rows)
    peak = peak_tflops(dev, args.peak_tflops)
    target_ms = step_flops / (args.target_mfu * peak * 1e9) if peak else None
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "size": args.size, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "loss_chunk_size": args.loss_chunk_size, "dtype": str(dtype).removeprefix("torch."),
        "rows": [{**asdict(r), "ms_per_step": r.ms_per_step, "tflops": r.tflops} for r in rows],
        "gemm_ms": sum(r.ms_per_step for r in rows if not r.name.startswith("attention")),
        "attention_ms": sum(r.ms_per_step for r in rows if r.name.startswith("attention")),
        "floor_ms": floor_ms,
        "step_tflop": step_flops / 1e12,
        "timed_tflop": sum(r.flops * r.calls for r in rows) / 1e12,  # = step_tflop when the chunk divides the tokens
        "peak_tflops": peak,
        "floor_mfu": step_flops / (floor_ms * peak * 1e9) if peak else None,
        "target_mfu": args.target_mfu,
        "target_step_ms": target_ms,
        "left_for_the_rest_ms": target_ms - floor_ms if target_ms else None,
        "copy_gb_per_s": copy_bandwidth(time, dev, args.copy_bytes),
    }


def markdown(res: dict, command: str) -> str:
    lines = [
        f"# Step floor: {res['size']} MHA, {res['batch_size']} x {res['seq_len']} tokens ({res['device']}, "
        f"{res['dtype']}, torch {res['torch']})", "",
        f"Command: `{command}`", "",
        "| piece | shape | calls/step | ms/call | TFLOP/s | ms/step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['name']} | {r['shape']} | {r['calls']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r['ms_per_step']:.2f} |")
    lines += ["", f"GEMMs {res['gemm_ms']:.2f} ms + attention {res['attention_ms']:.2f} ms = "
              f"**{res['floor_ms']:.2f} ms** for {res['step_tflop']:.1f} TFLOP a step "
              "(the model's count, dense attention)."]
    if res["peak_tflops"]:
        lines.append(f"At a peak of {res['peak_tflops']:.0f} TFLOP/s that floor is "
                     f"**{100 * res['floor_mfu']:.1f}% MFU**; "
                     f"{100 * res['target_mfu']:.0f}% MFU is a step of {res['target_step_ms']:.2f} ms, which leaves "
                     f"**{res['left_for_the_rest_ms']:.2f} ms** for everything else (normalisation, RoPE, gating, "
                     "residual adds, the loss's softmax, optimiser, time between kernels).")
    lines.append(f"Device copy: {res['copy_gb_per_s']:.0f} GB/s (bytes read + written).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--loss-chunk-size", type=int, default=65536)
    parser.add_argument("--target-mfu", type=float, default=0.55)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the per-GPU bf16 peak")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--copy-bytes", type=int, default=2**31, help="size of the copy that measures bandwidth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    res = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python3 benchmarks/step_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "step_floor.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res, command)
    (out / "step_floor.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
