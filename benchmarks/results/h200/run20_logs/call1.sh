. .carry/common.sh   # the same file as run19_logs/common.sh
finish() { cd $R && tar czf $OUT/all.tgz . ; }
ts() { name=$1; shift; timeout 100 python3 benchmarks/train_speed.py --attention mha --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f5,7,10,11,12)"; }
ts b32_default --batch-size 32
ts b32_compute --batch-size 32 --residual-dtype compute
ts b64_default --batch-size 64
ts b64_compute --batch-size 64 --residual-dtype compute
ts b64_compute_chunk64k --batch-size 64 --residual-dtype compute --loss-chunk-size 65536
ts b32_compute_combo --batch-size 32 --residual-dtype compute --compile-option combo_kernels=true
ts b32x16_default --batch-size 32 --grad-accum 16 --warmup 3 --steps 4
ts b32x16_compute --batch-size 32 --grad-accum 16 --warmup 3 --steps 4 --residual-dtype compute
ts b64x8_compute --batch-size 64 --grad-accum 8 --warmup 3 --steps 4 --residual-dtype compute
ts b32_default_again --batch-size 32
timeout 150 python3 benchmarks/train_speed.py --attention mha --batch-size 64 --residual-dtype compute --warmup 10 --steps 20 --profile --out $R/ts_b64_compute_profile > $R/ts_b64_compute_profile.log 2>&1; echo "profile rc=$?"
grep -h "^| mha\|^Per step" $R/ts_b64_compute_profile/train_speed.md

