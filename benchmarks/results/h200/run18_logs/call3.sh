# run 18, call 3: the MHA step: cuDNN against flash attention, batch 64, accumulation, CUDA graphs
. .carry/common.sh
ts() { name=$1; shift; timeout $T python3 benchmarks/train_speed.py --attention mha --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
T=60 ts b32_flash_profile --batch-size 32 --warmup 10 --steps 20 --attention-backend flash --profile
T=60 ts b32_default2 --batch-size 32 --warmup 10 --steps 20
T=60 ts b32_flash2 --batch-size 32 --warmup 10 --steps 20 --attention-backend flash
T=70 ts b64_flash --batch-size 64 --warmup 10 --steps 20 --attention-backend flash
T=70 ts b32x8_flash --batch-size 32 --grad-accum 8 --warmup 3 --steps 5 --attention-backend flash
T=90 ts b32_flash_cudagraphs --batch-size 32 --warmup 10 --steps 20 --attention-backend flash --compile-option triton.cudagraphs=true
grep -h "^| mha" $R/ts_*/train_speed.md
tail -3 $R/ts_b32_flash_cudagraphs.log
