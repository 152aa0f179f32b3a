. .carry/common.sh
finish() { cd $R && tar czf $OUT/all.tgz . ; }
ts() { name=$1; shift; timeout 150 python3 benchmarks/train_speed.py --attention mha --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f5,7,8,10,11,12)"; }
timeout 90 python3 benchmarks/step_floor.py --out $R/floor_b64 --batch-size 64 --loss-chunk-size 65536 > $R/floor_b64.log 2>&1; echo "floor b64 rc=$?"; grep -h "^GEMMs\|^At a\|^Device" $R/floor_b64/step_floor.md
timeout 90 python3 benchmarks/step_floor.py --out $R/floor_b32 --batch-size 32 --loss-chunk-size 8192 > $R/floor_b32.log 2>&1; echo "floor b32 rc=$?"; grep -h "^GEMMs\|^At a" $R/floor_b32/step_floor.md
ts b64_c64k --batch-size 64 --residual-dtype compute --loss-chunk-size 65536
ts b128_c128k --batch-size 128 --residual-dtype compute --loss-chunk-size 131072
timeout 200 python3 benchmarks/train_speed.py --attention mha --batch-size 64 --residual-dtype compute --loss-chunk-size 65536 --warmup 10 --steps 20 --profile --trace --out $R/ts_b64_c64k_profile > $R/ts_b64_c64k_profile.log 2>&1; echo "profile rc=$?"
grep -h "^| mha\|^Per step" $R/ts_b64_c64k_profile/train_speed.md
ts b64_c64k_again --batch-size 64 --residual-dtype compute --loss-chunk-size 65536
cat $R/floor_b64/step_floor.md | tail -25
