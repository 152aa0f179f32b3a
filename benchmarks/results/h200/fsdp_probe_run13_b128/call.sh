# x2, ~7 min: FSDP2 at 64 sequences per GPU against one GPU at the same global batch
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout 470 python3 benchmarks/fsdp_probe.py --out $OUT/fsdp_probe_b128 --runs mha:one-b128 mha:fsdp-b128 sas:fsdp-b128 sas:one-b128 --run-timeout-s 150 --budget-s 320 > $OUT/fsdp_probe.log 2>&1; echo probe rc=$? at $SECONDS
grep -E "^mha|^sas" $OUT/fsdp_probe.log
head -12 $OUT/fsdp_probe_b128/fsdp_probe.md | tail -5
