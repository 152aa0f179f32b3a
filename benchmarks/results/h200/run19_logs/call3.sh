# the committed levers: addmm(out_dtype) accumulation and residual_dtype compute; numerics of the latter
. .carry/common.sh
timeout 90 python3 benchmarks/loss_speed.py --sections loss --out $R/loss_new > $R/loss_new.log 2>&1; echo "loss new rc=$?"
EXP_OLD_WGRAD=1 timeout 90 python3 .carry/exp_patch.py benchmarks/loss_speed.py --sections loss --out $R/loss_old > $R/loss_old.log 2>&1; echo "loss old rc=$?"
grep -h "  loss " $R/loss_new.log $R/loss_old.log
ts() { name=$1; shift; timeout $T python3 .carry/exp_patch.py benchmarks/train_speed.py --attention mha --batch-size 32 --warmup 10 --steps 20 --out $R/ts_$name "$@" > $R/ts_$name.log 2>&1; echo "ts $name rc=$? $(grep -h '^| mha' $R/ts_$name/train_speed.md 2>/dev/null | cut -d'|' -f7,10,12)"; }
T=60 ts default
EXP_OLD_WGRAD=1 T=60 ts old_wgrad
T=60 ts residual_compute --residual-dtype compute
T=60 ts default2
# numerics: 400 steps of small MHA on real text, residual float32 (two seeds) against compute
timeout 120 python3 -m sasformer prepare .carry/corpus --tokenizer .carry/gpt2.tiktoken --out /tmp/data --no-progress > $R/prepare.log 2>&1; echo "prepare rc=$?"; tail -3 $R/prepare.log
tr() { name=$1; shift; timeout 100 python3 -m sasformer train --config configs/small.yaml --data_dir /tmp/data --out_dir $R/train_$name --batch_size 32 --micro_batch_size 32 --max_tokens null --max_steps 400 --optim.lr 1.5e-3 --optim.min_lr 1.5e-4 --optim.warmup_steps 40 --eval_interval 100 --eval_batches 20 --checkpoint_interval 0 --keep_last 1 --progress false --tensorboard false --resume none "$@" > $R/train_$name.log 2>&1; echo "train $name rc=$?"; grep -i "val" $R/train_$name.log | tail -5; }
tr f32_s0
tr compute_s0 --residual_dtype compute
tr f32_s1 --seed 1
