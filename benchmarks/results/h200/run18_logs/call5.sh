# run 18, call 5: the new default loss (Triton kernel, 4096 x 4) in the MHA step against the PyTorch chunks, and SAS's step
. .carry/common.sh
ts() { name=$1; shift; timeout $T python3 benchmarks/train_speed.py --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
T=55 ts mha_b32_default --attention mha --batch-size 32
T=55 ts mha_b32_ce_torch --attention mha --batch-size 32 --loss-impl chunked_torch
T=55 ts mha_b32_default_again --attention mha --batch-size 32
T=110 ts sas_b16_default --attention sas --batch-size 16
for n in mha_b32_default mha_b32_ce_torch mha_b32_default_again sas_b16_default; do echo "$n $(grep -h '^| \(mha\|sas\)' $R/ts_$n/train_speed.md)"; done
