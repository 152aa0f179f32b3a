# x2: the FSDP2 runs of the multi-GPU check again with fp32 parameters gathered (fsdp_param_dtype float32, the
# default since run 14), 64 sequences per GPU; ATTN=mha, then ATTN=sas (twice: it continues from finished runs)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
git log -1 --format=%H > $OUT/git.txt 2>&1
nvidia-smi topo -m > $OUT/topo.txt 2>&1
[ -f data/mg/meta.json ] || python3 -m sasformer prepare .carry/corpus --tokenizer .carry/tokenizer/gpt2.tiktoken --out data/mg --no-progress --workers 16 > $OUT/prep.log 2>&1
echo prep done at $SECONDS
timeout $((575-SECONDS)) python3 benchmarks/multi_gpu_check.py --data-dir data/mg --out runs/mgf --attention ${ATTN:-mha} --micro-batch 64 --runs 'one,one-repeat,fsdp,fsdp>one,one>fsdp' --run-timeout 400 > $OUT/mg.log 2>&1; echo mg rc=$? at $SECONDS
mkdir -p $OUT/mg; cp runs/mgf/multi_gpu_check.* runs/mgf/loss_curves.png $OUT/mg/ 2>/dev/null
tar czf $OUT/mg/runs.tgz --exclude=checkpoints runs/mgf/runs 2>/dev/null
grep -E "rc=|windows" $OUT/mg.log | tail -12; grep '^| ' $OUT/mg.log
