# exploratory: which levers move the MHA step (batch 32, T 1024, compiled bf16)
. .carry/common.sh
ts() { name=$1; shift; timeout $T python3 .carry/exp_patch.py --attention mha --batch-size 32 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f7,10,12)"; }
T=60 ts base
T=60 ts chunk16k --loss-chunk-size 16384
T=60 ts chunk32k --loss-chunk-size 32768
EXP_BF16_RESIDUAL=1 T=60 ts bf16res
EXP_CLIP_IN_ADAM=1 T=60 ts clipadam
T=80 ts cudagraphs --compile-option triton.cudagraphs=true
EXP_BF16_RESIDUAL=1 EXP_CLIP_IN_ADAM=1 T=60 ts combo
T=60 ts base2
EXP_BF16_RESIDUAL=1 EXP_CLIP_IN_ADAM=1 T=70 ts combo_profile --profile
grep -h "^| mha" $R/ts_*/train_speed.md
