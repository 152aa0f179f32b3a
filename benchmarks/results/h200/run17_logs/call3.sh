# call 3: after the graph-break fix: whole-model gradient check, compiled model rows at T=1024, trainer steps
. .carry/common.sh
timeout 150 python3 benchmarks/train_check.py --out $R/train_check --attention sas \
  --settings "compiled bf16, auto paths" "compiled bf16, blocked simulation" > $R/train_check.log 2>&1
echo "train_check rc=$?"; grep -E "^\| (eager|compiled)" $R/train_check/*.md | cut -c1-220
C=mha,sas_24x128,sas_24x128_blocked,sas_24x64,sas_24x128_reference,sas_24x128_blocked32
timeout 250 python3 benchmarks/sas_speed.py --out $R/model1024 --sections check,model --seq-lens 1024 \
  --budget-s 215 --variants $C --compiled-variants $C --modes compiled > $R/model_T1024.log 2>&1
echo "model rc=$?"; grep -E "^\| 1024" $R/model1024/sas_speed.md
ts() { name=$1; shift; timeout 80 python3 benchmarks/train_speed.py --batch-size 16 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
ts sas --attention sas --profile
SASFORMER_SIMULATE=blocked ts sas_blocked --attention sas
grep -h "^| sas" $R/ts_*/train_speed.md
