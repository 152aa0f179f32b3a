# x2: the multi-GPU check at 64 sequences per GPU (global batch 128), where FSDP2 scaled in run 13.
# Re-run the same command to continue (finished runs are kept in runs/mg128); ATTN=mha or ATTN=sas per call.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi topo -m > $OUT/topo.txt 2>&1
[ -f data/mg/meta.json ] || python3 -m sasformer prepare .carry/corpus --tokenizer .carry/tokenizer/gpt2.tiktoken --out data/mg --no-progress --workers 16 > $OUT/prep.log 2>&1
echo prep done at $SECONDS
timeout $((575-SECONDS)) python3 benchmarks/multi_gpu_check.py --data-dir data/mg --out runs/mg128 --attention ${ATTN:-mha} --micro-batch 64 --repeats ${REPEATS:-1} --run-timeout 400 > $OUT/mg.log 2>&1; echo mg rc=$? at $SECONDS
mkdir -p $OUT/mg; cp runs/mg128/multi_gpu_check.* runs/mg128/loss_curves.png $OUT/mg/ 2>/dev/null
tar czf $OUT/mg/runs.tgz --exclude=checkpoints runs/mg128/runs 2>/dev/null
grep -E "rc=|windows" $OUT/mg.log | tail -12; grep '^| ' $OUT/mg.log
