. .carry/common.sh
finish() { cd $R && tar czf $OUT/all.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='data' . ; }
python3 -m sasformer prepare default --vocab-size 8192 --val-fraction 0.05 --out $R/data > $R/prepare.log 2>&1; echo "prepare rc=$?"
c="--config configs/small.yaml --data_dir $R/data --batch_size 32 --micro_batch_size 16 --max_tokens null --max_steps 120 --optim.warmup_steps 10 --eval_interval 20 --eval_batches 1 --log_interval 1 --checkpoint_interval 20 --keep_last 3 --model.attention mha --out_dir $R/killed"
# a crash of the whole job: SIGKILL to torchrun and both workers (torchrun starts them in sessions of their own, so every process of the job is killed by name) as soon as the step-40 checkpoint is in place
setsid torchrun --standalone --nproc-per-node 2 -m sasformer train $c > $R/killed_first.log 2>&1 &
pid=$!; for i in $(seq 1 3000); do [ -d $R/killed/checkpoints/step_000040 ] && break; sleep 0.05; done
pkill -9 -f 'sasformer train'; sleep 3
echo "killed at: $(grep '"kind": "train"' $R/killed/metrics.jsonl | tail -1 | cut -c1-40); left: $(pgrep -fc 'sasformer train' || true)"
ls $R/killed/checkpoints
cp $R/killed/metrics.jsonl $R/killed_before.jsonl
timeout 200 torchrun --standalone --nproc-per-node 2 -m sasformer train $c > $R/killed_again.log 2>&1; echo "again rc=$?"
grep -a "resum" $R/killed_again.log | head -3
python3 - "$R" <<'PY'
import json, sys, pathlib
R = pathlib.Path(sys.argv[1])
def losses(path):
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out
before, after = losses(R / "killed_before.jsonl"), losses(R / "killed/metrics.jsonl")
redone = sorted(s for s in after if len(after[s]) > len(before.get(s, [])) and s in before)
print("steps trained before the kill:", max(before), "; redone after resume and logged before:", redone[:1], "-", redone[-1:])
for s in redone:
    print(s, before[s][-1], after[s][-1], "equal" if before[s][-1] == after[s][-1] else f"rel {abs(before[s][-1]-after[s][-1])/before[s][-1]:.2e}")
print("final step", max(after), "records per step max", max(len(v) for v in after.values()))
PY
