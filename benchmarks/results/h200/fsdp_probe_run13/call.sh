# x2, ~9 min: FSDP2 at 32 sequences per GPU against one GPU at the same global batch (host-bound at 16?)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 585 python3 benchmarks/fsdp_probe.py --out $OUT/fsdp_probe --runs mha:one-b64 mha:fsdp-b64 sas:one-b64 sas:fsdp-b64 mha:fsdp mha:one --run-timeout-s 150 --budget-s 470 > $OUT/fsdp_probe.log 2>&1; echo probe rc=$? at $SECONDS
grep -E "^mha|^sas" $OUT/fsdp_probe.log
head -16 $OUT/fsdp_probe/fsdp_probe.md | tail -9
