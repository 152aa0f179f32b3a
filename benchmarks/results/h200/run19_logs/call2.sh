. .carry/common.sh
ts() { name=$1; shift; timeout $T python3 .carry/exp_patch.py --attention mha --batch-size 32 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f7,10,12)"; }
EXP_BF16_RESIDUAL=1 T=60 ts bf16res
EXP_BF16_RESIDUAL=1 T=60 ts bf16res_chunk32k --loss-chunk-size 32768
T=70 ts base_profile --profile
EXP_BF16_RESIDUAL=1 T=70 ts bf16res_profile --profile
T=250 ts maxautotune --compile-mode max-autotune-no-cudagraphs
tail -5 $R/ts_maxautotune.log
