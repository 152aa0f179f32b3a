# call 1: whole-model gradient check of SAS (default and blocked), the layer compiled, the trainer's steps
. .carry/common.sh
timeout 180 python3 benchmarks/train_check.py --out $R/train_check --attention sas \
  --settings "compiled bf16, auto paths" "compiled bf16, blocked simulation" > $R/train_check.log 2>&1
echo "train_check rc=$?"
timeout 170 python3 benchmarks/sas_speed.py --out $R/layer --sections check,layer --seq-lens 1024 --budget-s 140 \
  --compiled-layer-paths reference,banded,blocked > $R/layer.log 2>&1
echo "layer rc=$?"
ts() { name=$1; shift; timeout 80 python3 benchmarks/train_speed.py --batch-size 16 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
ts sas --attention sas --profile
SASFORMER_SIMULATE=blocked ts sas_blocked --attention sas
ts mha --attention mha
grep -h "tok" $R/ts_*/train_speed.md 2>/dev/null | head -20
tail -5 $R/train_check.log
