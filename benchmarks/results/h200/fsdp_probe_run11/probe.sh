# x2 machine: why FSDP2 does not scale (run 10). ~8 min; the decisive runs (units 0 and 4) come first.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T="python3 -m torch.distributed.run --standalone --nproc-per-node 2"
A="--attention mha --batch-size 32 --micro-batch-size 16 --warmup 10 --steps 20 --profile"
timeout 60 $T benchmarks/collective_bandwidth.py --out $OUT/cb > $OUT/cb.log 2>&1; echo cb at $SECONDS; tail -10 $OUT/cb.log
timeout 100 $T benchmarks/train_speed.py $A --parallel ddp --out $OUT/ts-ddp > $OUT/ts-ddp.log 2>&1; echo ddp at $SECONDS
timeout 100 $T benchmarks/train_speed.py $A --parallel fsdp --out $OUT/ts-fsdp > $OUT/ts-fsdp.log 2>&1; echo fsdp at $SECONDS
for u in 0 4; do timeout 100 $T benchmarks/train_speed.py $A --parallel fsdp --fsdp-blocks-per-unit $u --out $OUT/ts-fsdp-u$u > $OUT/ts-fsdp-u$u.log 2>&1; echo fsdp-u$u at $SECONDS; done
grep -h -E '^\| mha|^Per step' $OUT/ts-*/train_speed.md
timeout 90 $T benchmarks/train_speed.py $A --parallel fsdp --no-fsdp-reshard-after-forward --out $OUT/ts-fsdp-zero2 > $OUT/ts-fsdp-zero2.log 2>&1; echo fsdp-zero2 at $SECONDS
timeout 90 python3 benchmarks/train_speed.py $A --out $OUT/ts-one > $OUT/ts-one.log 2>&1; echo one at $SECONDS
timeout 80 $T benchmarks/train_speed.py $A --parallel fsdp --no-compile --out $OUT/ts-fsdp-eager > $OUT/ts-fsdp-eager.log 2>&1; echo fsdp-eager at $SECONDS
grep -h -E '^\| mha' $OUT/ts-fsdp-zero2/train_speed.md $OUT/ts-one/train_speed.md $OUT/ts-fsdp-eager/train_speed.md
