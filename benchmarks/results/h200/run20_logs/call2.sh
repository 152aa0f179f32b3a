. .carry/common.sh   # the same file as run19_logs/common.sh
finish() { cd $R && tar czf $OUT/all.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='data' . ; }
python3 -m sasformer prepare default --vocab-size 8192 --out $R/data > $R/prepare.log 2>&1; echo "prepare rc=$?"; tail -2 $R/prepare.log
common() { echo --config ${CFG:-configs/small.yaml} --data_dir $R/data --batch_size 16 --micro_batch_size 16 --max_tokens null --max_steps 60 --optim.warmup_steps 10 --eval_interval 30 --eval_batches 1 --log_interval 1 --checkpoint_interval 30 --keep_last 3 --model.attention $1; }
for att in mha sas; do
  tr() { name=$1; shift; timeout 240 python3 -m sasformer train $(common $att) --out_dir $R/$att-$name "$@" > $R/$att-$name.log 2>&1; echo "$att $name rc=$?"; }
  tr full
  tr repeat
  tr resumed --resume $R/$att-full/checkpoints/step_000030
  # a real kill -9 once the step-30 checkpoint is in place, then the same command again (resume auto)
  python3 -m sasformer train $(common $att) --out_dir $R/$att-killed > $R/$att-killed.log 2>&1 &
  pid=$!; for i in $(seq 1 600); do [ -d $R/$att-killed/checkpoints/step_000030 ] && break; sleep 0.2; done
  sleep 1; kill -9 $pid; wait $pid 2>/dev/null; echo "$att killed at $(tail -c 300 $R/$att-killed/metrics.jsonl | tail -1 | cut -c1-60)"
  tr killed
done
python3 - "$R" <<'PY'
import json, sys, pathlib
R = pathlib.Path(sys.argv[1])
def losses(run):
    out = {}
    for line in (R / run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") in ("train", "val"):
            out[(r["kind"], r["step"])] = r.get("loss", r.get("val_loss"))
    return out
for att in ("mha", "sas"):
    full = losses(f"{att}-full")
    print(att, "keys", sorted({k for k, _ in full}))
    for other in ("repeat", "resumed", "killed"):
        o = losses(f"{att}-{other}")
        diffs = [abs(o[k] - full[k]) / abs(full[k]) for k in full if k in o and k[1] > 30 and full[k] is not None]
        same = sum(o[k] == full[k] for k in full if k in o and k[1] > 30)
        print(f"{att} {other:8s} steps>30 compared {len(diffs)}, bit-equal {same}, max rel diff {max(diffs):.2e}" if diffs else f"{att} {other}: nothing to compare")
PY
