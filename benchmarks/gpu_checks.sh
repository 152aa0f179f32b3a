#!/usr/bin/env bash
# Every GPU correctness check in one command, for a new GPU, driver, torch or triton version:
#   bash benchmarks/gpu_checks.sh OUT_DIR
# 1. fused_kernel_report.py: the Triton simulation kernels (bf16) against the fp32 reference, per shape;
# 2. compile_probe.py: each piece of a SAS layer traced by torch.compile against eager (fp32);
# 3. train_check.py: whole-model gradients of every variant, eager and compiled, against fp32 eager.
# Each writes its report under OUT_DIR; the exit status is non-zero when any of them failed.
# The whole-model check compiles each variant twice (about 6-8 minutes on an H200 for the seven);
# it saves its report after every variant, SAS first, so a run under a time limit keeps the rest.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-}:$(cd "$(dirname "$0")/.." && pwd)"
status=0
python3 benchmarks/fused_kernel_report.py --out "$out/fused" || status=1
python3 benchmarks/compile_probe.py --out "$out/compile_probe.md" || status=1
python3 benchmarks/train_check.py --out "$out/train" --layers 2 --attention sas mha mla sas:rope=none gqa mqa tpa || status=1
python3 benchmarks/train_check.py --out "$out/train-triton" --layers 2 --attention sas \
    --settings "compiled bf16, triton simulation" "compiled bf16, banded recompute" || status=1
echo "gpu checks: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
