# run 18, call 4: the cross-entropy kernel's launch shapes, then the MHA step with the fastest one against the default
. .carry/common.sh
timeout 200 python3 benchmarks/loss_speed.py --out $R/loss > $R/loss_speed.log 2>&1
echo "loss_speed rc=$?"; grep -E "^\| " $R/loss/loss_speed.md
BEST=$(python3 -c "
import json; v = json.load(open('$R/loss/loss_speed.json'))['rows']['variants']
t = {k: r['ms'] for k, r in v.items() if k.startswith('triton') and 'ms' in r}
print(min(t, key=t.get).split()[1])")
echo "fastest tile: $BEST"
ts() { name=$1; shift; timeout 55 python3 benchmarks/train_speed.py --attention mha --batch-size 32 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$?"; }
ts b32_default
SASFORMER_CE_TILE=$BEST ts b32_ce_triton_best --loss-impl chunked_triton
ts b32_ce_triton_default --loss-impl chunked_triton
ts b32_default_again
for n in b32_default b32_ce_triton_best b32_ce_triton_default b32_default_again; do echo "$n $(grep -h '^| mha' $R/ts_$n/train_speed.md)"; done
