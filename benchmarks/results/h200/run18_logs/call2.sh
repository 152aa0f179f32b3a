# run 18, call 2: compiled blocked gradients, the layer compiled at the fixed code, SAS step profile, MHA flash
. .carry/common.sh
timeout 140 python3 benchmarks/train_check.py --out $R/train_check --attention sas \
  --settings "compiled bf16, blocked simulation" > $R/train_check.log 2>&1
echo "train_check rc=$?"; grep -E "^\| (eager|compiled)" $R/train_check/*.md | cut -c1-200
timeout 130 python3 benchmarks/sas_speed.py --out $R/layer --sections check,layer --seq-lens 1024 --budget-s 100 \
  --compiled-layer-paths reference,banded > $R/layer.log 2>&1
echo "layer rc=$?"; grep -E "^\[.*layer " $R/layer.log | head -20
ts() { name=$1; shift; timeout $T python3 benchmarks/train_speed.py --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
T=130 ts sas_b16_profile --attention sas --batch-size 16 --profile
T=60 ts mha_b32 --attention mha --batch-size 32
T=60 ts mha_b32_flash --attention mha --batch-size 32 --attention-backend flash
grep -h "^| \(mha\|sas\)" $R/ts_*/train_speed.md
