"""Whole-model gradient check on the GPU: does a training step in bf16 (eager and compiled) give the
gradients of the fp32 eager reference (naive simulation, math attention)?

    python3 benchmarks/train_check.py --out DIR [--size mini] [--attention mha sas] [--batch 8]

For every variant and setting it prints the loss difference and the parameters whose gradient is furthest
from the reference (relative L2 error). bf16 alone gives errors of about 1e-2; a wrong kernel or backend
gives errors of order 1. Writes ``train_check.json`` and ``train_check.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset

SETTINGS = {  # name: (compile, bf16, environment)
    "eager bf16, auto paths": (False, True, {}),
    "eager bf16, naive simulation": (False, True, {"SASFORMER_SIMULATE": "naive"}),
    "eager bf16, math attention": (False, True, {"SASFORMER_ATTENTION": "math"}),
    "compiled bf16, auto paths": (True, True, {}),
    "compiled bf16, math attention": (True, True, {"SASFORMER_ATTENTION": "math"}),
    "compiled bf16, naive simulation": (True, True, {"SASFORMER_SIMULATE": "naive"}),
    "compiled bf16, default attention": (True, True, {"SASFORMER_ATTENTION": "default"}),
    "compiled fp32, auto paths": (True, False, {}),
    "compiled fp32, math attention": (True, False, {"SASFORMER_ATTENTION": "math"}),
    # SAS layers traced into the compiled graph (they leave it by default; sasformer/layers/sas.py)
    "compiled bf16, SAS traced": (True, True, {"SASFORMER_COMPILE_SAS": "1"}),
    "compiled fp32, SAS traced, math attention": (True, False, {"SASFORMER_COMPILE_SAS": "1",
                                                                "SASFORMER_ATTENTION": "math"}),
}
ENV_VARS = ("SASFORMER_SIMULATE", "SASFORMER_ATTENTION", "SASFORMER_COMPILE_SAS")


def gradients(model: DecoderLM, x: torch.Tensor, y: torch.Tensor, compiled: bool, bf16: bool,
              env: dict[str, str]) -> tuple[float, dict[str, torch.Tensor]]:
    for name in ENV_VARS:
        os.environ[name] = env.get(name, "")
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    step = torch.compile(model) if compiled else model
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = step(x, targets=y)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _value(text: str):
    """``"1"`` -> 1, ``"none"`` -> "none": variant arguments from the command line."""
    try:
        return int(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="mini")
    parser.add_argument("--attention", nargs="+", default=["mha", "sas"],
                        help="variants, optionally with arguments: sas:rope=none,kernel_size=1")
    parser.add_argument("--settings", nargs="+", default=["eager bf16, auto paths", "compiled bf16, auto paths",
                                                        "compiled bf16, SAS traced", "compiled fp32, math attention"],
                        choices=list(SETTINGS))
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {}
    lines = ["# Whole-model gradient check", "", f"`benchmarks/train_check.py {' '.join(sys.argv[1:])}` "
             f"on {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    for spec in args.attention:
        attention, _, arg_text = spec.partition(":")
        attention_args = {k: _value(v) for k, v in (item.split("=") for item in arg_text.split(",") if item)}
        overrides = {"n_layers": args.layers} if args.layers else {}
        torch.manual_seed(0)
        model = DecoderLM(preset(args.size, attention, attention_args=attention_args, **overrides)).cuda()
        T = model.config.max_seq_len
        x = torch.randint(0, model.config.vocab_size, (args.batch, T), device="cuda")
        y = torch.roll(x, -1, dims=1)
        ref_loss, ref = gradients(model, x, y, False, False, {"SASFORMER_SIMULATE": "naive",
                                                                  "SASFORMER_ATTENTION": "math"})
        report[spec] = {"reference_loss": ref_loss, "settings": {}}
        lines += [f"## {spec} (reference loss {ref_loss:.5f})", "",
                  "| setting | loss diff | worst parameters (relative gradient error) |", "|---|---:|---|"]
        for name in args.settings:
            compiled, bf16, env = SETTINGS[name]
            try:
                loss, grads = gradients(model, x, y, compiled, bf16, env)
            except Exception as error:  # report and go on: one broken setting must not hide the others
                lines.append(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} | |")
                continue
            errors = {n: ((grads[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
            worst = sorted(errors.items(), key=lambda kv: -kv[1])[:4]
            report[spec]["settings"][name] = {"loss": loss, "errors": errors}
            lines.append(f"| {name} | {loss - ref_loss:+.5f} | " + ", ".join(f"`{n}` {e:.3g}" for n, e in worst) + " |")
        lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_check.json").write_text(json.dumps(report, indent=1))
    (out / "train_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
