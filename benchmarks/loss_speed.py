"""LM-head cross-entropy speed on one CUDA GPU: the Triton row kernel's launch shapes against Inductor's kernel.

    python3 benchmarks/loss_speed.py --out DIR [--rows 8192] [--vocab 50304] [--tiles 16384x32,4096x8,...]

Two measurements, each behind a correctness check that keeps a failing variant out of the timings:
- rows: one chunk of bf16 logits (--rows x --vocab, as the trainer's chunked loss sees it) turned into row losses
  and the gradient ``(softmax - onehot) * scale``: the Triton kernel at every --tiles launch shape (it overwrites
  the logits; a copy restores them outside the timed region), and the same arithmetic in PyTorch compiled by
  Inductor (``chunked_torch``'s per-chunk code). Bandwidth counts one read and one write of the logits, the
  least any version moves.
- loss: the whole ``linear_cross_entropy`` forward and backward over --tokens x --d-model hidden states (GEMMs
  included) for ``chunked_torch`` (compiled) and ``chunked_triton`` with its default shape and the fastest
  passing shape of the rows section.

Checks compare the loss and gradient with the fp32 reference (``cross_entropy_rows_naive``, or
``linear_cross_entropy_naive``) by relative L2 error. Writes DIR/loss_speed.json and DIR/loss_speed.md.
``--smoke`` runs tiny shapes on the CPU in Triton's interpreter (the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_TILES = "16384x32,16384x16,8192x32,8192x16,8192x8,4096x16,4096x8,4096x4,2048x8,2048x4,2048x2,1024x4,1024x2"
# bf16 keeps 8 bits of mantissa: a gradient entry rounds by up to 2^-9 of itself
GRAD_LIMIT = 1e-2
LOSS_LIMIT = 1e-4


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"4096x8,2048x4"`` -> [(4096, 8), (2048, 4)], each checked by the kernel's own rules."""
    from sasformer.ops.cross_entropy.kernel import block_and_warps, parse_tile

    tiles = []
    for item in text.split(","):
        try:
            block, warps = parse_tile(item)
        except ValueError as err:
            raise SystemExit(f"--tiles: {err}") from None
        tiles.append(block_and_warps(1, block, warps))
    return tiles


def rows_torch(logits_CV, targets_C, scale, ignore_index: int = -100):
    """The per-chunk arithmetic of ``chunked_torch`` on given logits: row losses (fp32) and the scaled gradient."""
    import torch

    x_CV = logits_CV.float()
    valid_C = targets_C != ignore_index
    target_C = torch.where(valid_C, targets_C, 0)
    lse_C = torch.logsumexp(x_CV, dim=-1)
    loss_C = torch.where(valid_C, lse_C - x_CV.gather(1, target_C.unsqueeze(1)).squeeze(1), 0.0)
    onehot_CV = torch.arange(x_CV.shape[1], device=x_CV.device) == target_C.unsqueeze(1)
    grad_CV = torch.exp(x_CV - lse_C.unsqueeze(1)) - onehot_CV.float()
    grad_CV = torch.where(valid_C.unsqueeze(1), grad_CV * scale, 0.0)
    return loss_C, grad_CV.to(logits_CV.dtype)


def compiler(smoke: bool) -> Callable:
    """``torch.compile``; in a smoke run its eager backend, which traces the same code without building kernels."""
    import torch

    return (lambda fn: torch.compile(fn, backend="eager", dynamic=False)) if smoke else \
        (lambda fn: torch.compile(fn, dynamic=False))


def rows_section(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from benchmarks.checks import relative_error
    from benchmarks.timing import median_ms
    from sasformer.ops.cross_entropy.kernel import cross_entropy_rows_
    from sasformer.ops.cross_entropy.naive import cross_entropy_rows_naive

    cuda = device == "cuda"
    C, V = args.rows, args.vocab
    gen = torch.Generator(device=device).manual_seed(0)
    pristine = (3 * torch.randn(C, V, device=device, generator=gen)).to(torch.bfloat16)
    targets = torch.randint(0, V, (C,), device=device, generator=gen)
    targets[::16] = -100  # one row in 16 ignored, as padding gives
    scale = torch.tensor([1.0 / C], device=device)
    want_loss, want_grad = cross_entropy_rows_naive(pristine, targets, scale)
    gigabytes = 2 * C * V * pristine.element_size() / 1e9
    out: dict[str, Any] = {"rows": C, "vocab": V, "gigabytes_moved": gigabytes, "variants": {}}

    def record(name: str, loss, grad, call, prepare) -> None:
        errors = {"loss": relative_error(loss, want_loss), "grad": relative_error(grad, want_grad)}
        passed = errors["loss"] <= LOSS_LIMIT and errors["grad"] <= GRAD_LIMIT
        row: dict[str, Any] = {"errors": errors, "passed": passed}
        if row["passed"]:
            row["ms"] = median_ms(call, args.reps, cuda, prepare)
            row["tb_per_s"] = gigabytes / row["ms"]
        out["variants"][name] = row
        speed = f"{row['ms']:.3f} ms, {row['tb_per_s']:.2f} TB/s" if row["passed"] else "FAILED, not timed"
        print(f"  rows {name}: {speed} (errors: loss {errors['loss']:.1e}, grad {errors['grad']:.1e})", flush=True)

    work = torch.empty_like(pristine)
    loss = torch.empty(C, dtype=torch.float32, device=device)
    # every variant is timed after the same copy, so each starts with the GPU busy and its launch hidden alike
    restore = lambda: work.copy_(pristine)  # noqa: E731
    for block, warps in parse_tiles(args.tiles):
        def kernel(block=block, warps=warps):
            cross_entropy_rows_(work, targets, loss, scale, -100, with_grad=True, block=block, warps=warps)
        restore()
        loss.fill_(float("nan"))  # a row the kernel does not write fails the check
        kernel()
        record(f"triton {block}x{warps}", loss.clone(), work.clone(), kernel, restore)

    compiled = compiler(args.smoke)(rows_torch)
    got_loss, got_grad = compiled(pristine, targets, scale)
    record("torch compiled (chunked_torch's code)", got_loss, got_grad, lambda: compiled(pristine, targets, scale),
           restore)
    return out


def loss_section(args: argparse.Namespace, device: str, best_tile: tuple[int, int] | None) -> dict[str, Any]:
    import torch

    from benchmarks.checks import relative_error
    from benchmarks.timing import median_ms
    from sasformer.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_naive
    from sasformer.ops.cross_entropy.kernel import TILE_ENV_VAR, block_and_warps

    cuda = device == "cuda"
    N, d, V = args.tokens, args.d_model, args.vocab
    gen = torch.Generator(device=device).manual_seed(1)
    h = (torch.randn(N, d, device=device, generator=gen)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, d, device=device, generator=gen) / d ** 0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = linear_cross_entropy_naive(h32, w32, targets)
    want_h, want_w = torch.autograd.grad(want, (h32, w32))
    out: dict[str, Any] = {"tokens": N, "d_model": d, "vocab": V, "chunk_size": args.chunk_size, "variants": {}}

    def fwd_bwd(fn):
        def call():
            h.grad = w.grad = None
            loss = fn(h, w, targets)
            loss.backward()
            return loss.detach()
        return call

    variants: list[tuple[str, str, str | None]] = [("chunked_torch, compiled", "chunked_torch", None),
                                                   ("chunked_triton, default shape", "chunked_triton", "")]
    if best_tile is not None:
        variants.append((f"chunked_triton, {best_tile[0]}x{best_tile[1]}", "chunked_triton",
                         f"{best_tile[0]}x{best_tile[1]}"))
    for name, impl, tile in variants:
        # the kernel reads its shape per call: "" is its default, whatever the caller's environment says
        with mock.patch.dict(os.environ, {TILE_ENV_VAR: tile or ""}):
            fn = compiler(args.smoke)(lambda h_, w_, t_, impl=impl: linear_cross_entropy(
                h_, w_, t_, impl=impl, chunk_size=args.chunk_size))
            call = fwd_bwd(fn)
            errors = {"loss": relative_error(call(), want),
                      "grad_h": relative_error(h.grad, want_h), "grad_w": relative_error(w.grad, want_w)}
            passed = errors["loss"] <= LOSS_LIMIT and max(errors["grad_h"], errors["grad_w"]) <= GRAD_LIMIT
            if impl == "chunked_triton":
                tile = "{}x{}".format(*block_and_warps(V))  # what the kernel launched with
            row: dict[str, Any] = {"impl": impl, "tile": tile, "errors": errors, "passed": passed}
            if passed:
                row["ms"] = median_ms(call, args.reps, cuda)
        out["variants"][name] = row
        speed = f"{row['ms']:.2f} ms" if passed else "FAILED, not timed"
        print(f"  loss {name}: {speed} (errors: {', '.join(f'{k} {v:.1e}' for k, v in errors.items())})",
              flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = ["# LM-head cross-entropy speed", "", f"`{res['command']}`", "",
             f"{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"git {env.get('git_revision')}",
             ""]
    rows = res.get("rows")
    if rows:
        lines += [f"## One chunk: {rows['rows']} x {rows['vocab']} bf16 logits to row losses and their gradient", "",
                  f"Bandwidth: one read and one write of the logits ({rows['gigabytes_moved']:.2f} GB) over the time. "
                  f"Limits: loss {LOSS_LIMIT:g}, gradient {GRAD_LIMIT:g} (relative L2 against fp32).", "",
                  "| variant | ms | TB/s | loss error | gradient error |", "|---|---:|---:|---:|---:|"]
        for name, row in rows["variants"].items():
            ms = f"{row['ms']:.3f}" if "ms" in row else "FAILED"
            tbs = f"{row['tb_per_s']:.2f}" if "tb_per_s" in row else "-"
            lines.append(f"| {name} | {ms} | {tbs} | {row['errors']['loss']:.1e} | {row['errors']['grad']:.1e} |")
        lines.append("")
    loss = res.get("loss")
    if loss:
        lines += [f"## Whole loss, forward + backward: {loss['tokens']} tokens, d = {loss['d_model']}, "
                  f"V = {loss['vocab']}, chunks of {loss['chunk_size']}", "",
                  "| variant | ms | loss error | grad h error | grad W error |", "|---|---:|---:|---:|---:|"]
        for name, row in loss["variants"].items():
            ms = f"{row['ms']:.2f}" if "ms" in row else "FAILED"
            e = row["errors"]
            lines.append(f"| {name} | {ms} | {e['loss']:.1e} | {e['grad_h']:.1e} | {e['grad_w']:.1e} |")
        lines.append("")
    for section, error in res["errors"].items():
        lines.append(f"Section {section} failed: {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for loss_speed.json and loss_speed.md")
    p.add_argument("--rows", type=int, default=8192, help="rows of the chunk (the trainer's chunk size)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--tiles", default=None, help=f"comma list of BLOCKxWARPS launch shapes (default {DEFAULT_TILES})")
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the whole-loss measurement")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sections", default="rows,loss", help="comma list of rows,loss")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter")
    args = p.parse_args(argv)
    if args.smoke:
        # Triton picks the interpreter when a kernel is defined: it has to be on before the first import
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels in Triton's interpreter, which has to be chosen before "
                             "Triton is imported; run it in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
        args.rows, args.vocab, args.tokens, args.d_model, args.chunk_size, args.reps = 9, 300, 21, 16, 8, 2
        args.tiles = args.tiles or "64x1,128x2"
    args.tiles = args.tiles or DEFAULT_TILES
    import torch

    from sasformer.compare.env import environment

    if not args.smoke and not torch.cuda.is_available():
        print("loss_speed.py needs a CUDA GPU (or --smoke for a CPU run of the code paths)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    args_given = sys.argv[1:] if argv is None else argv
    res: dict[str, Any] = {"command": " ".join(["python3", "benchmarks/loss_speed.py", *args_given]),
                           "environment": environment(torch.device(device)), "errors": {}}
    sections = {s.strip() for s in args.sections.split(",")}
    best = None
    args.out.mkdir(parents=True, exist_ok=True)
    for section in ("rows", "loss"):
        if section not in sections:
            continue
        try:
            res[section] = rows_section(args, device) if section == "rows" else loss_section(args, device, best)
        except Exception as err:  # noqa: BLE001 - recorded; the other section still runs
            res["errors"][section] = f"{type(err).__name__}: {err}"
            print(f"section {section} failed: {res['errors'][section]}", file=sys.stderr, flush=True)
        if section == "rows" and "rows" in res:
            timed = {name: row for name, row in res["rows"]["variants"].items()
                     if name.startswith("triton") and "ms" in row}
            if timed:
                fastest = min(timed, key=lambda name: timed[name]["ms"])
                best = tuple(int(x) for x in fastest.split()[1].split("x"))
        (args.out / "loss_speed.json").write_text(json.dumps(res, indent=1))  # kept if the next section crashes
    (args.out / "loss_speed.md").write_text(markdown(res))
    print(markdown(res))
    failed = [name for sec in ("rows", "loss") for name, row in res.get(sec, {}).get("variants", {}).items()
              if not row["passed"]]
    return 1 if failed or res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
