. .carry/common.sh
ts() { name=$1; shift; timeout 70 python3 benchmarks/train_speed.py --attention mha --batch-size 32 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f7,10,11,12)"; }
ts default
ts residual_compute --residual-dtype compute
ts default2
