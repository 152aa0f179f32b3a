. .carry/common.sh
finish() { cd $R && tar czf $OUT/all.tgz . ; }
ts() { name=$1; shift; timeout 170 python3 benchmarks/train_speed.py --attention mha --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f5,7,8,10,11,12)"; }
timeout 90 python3 benchmarks/step_floor.py --out $R/floor_b128 --batch-size 128 --loss-chunk-size 131072 > $R/floor_b128.log 2>&1; echo "floor b128 rc=$?"; grep -h "^GEMMs\|^At a" $R/floor_b128/step_floor.md
ts b128_c128k_fp32 --batch-size 128 --loss-chunk-size 131072
ts b128x4_c128k --batch-size 128 --grad-accum 4 --residual-dtype compute --loss-chunk-size 131072 --warmup 3 --steps 4
ts b128_c128k_again --batch-size 128 --residual-dtype compute --loss-chunk-size 131072
