. .carry/common.sh
finish() { cd $R && tar czf $OUT/all.tgz . ; }
a="--attention mha --batch-size 64 --parallel ddp --residual-dtype compute --warmup 10 --steps 20"
timeout 110 torchrun --standalone --nproc-per-node 2 benchmarks/train_speed.py $a --out $R/inside > $R/inside.log 2>&1; echo "inside rc=$? $(grep -h '^| mha' $R/inside/train_speed.md)"
timeout 110 torchrun --standalone --nproc-per-node 2 .carry/old_ddp.py $a --out $R/around > $R/around.log 2>&1; echo "around rc=$? $(grep -h '^| mha' $R/around/train_speed.md)"
