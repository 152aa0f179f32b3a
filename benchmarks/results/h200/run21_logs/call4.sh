. .carry/common.sh
finish() { cd $R && tar czf $OUT/all.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='data' . ; }
nvidia-smi -L
python3 -m sasformer prepare default --vocab-size 8192 --val-fraction 0.05 --out $R/data > $R/prepare.log 2>&1; echo "prepare rc=$?"
c="--config configs/small.yaml --data_dir $R/data --batch_size 32 --micro_batch_size 16 --max_tokens null --max_steps 40 --optim.warmup_steps 10 --eval_interval 20 --eval_batches 1 --log_interval 1 --checkpoint_interval 20 --keep_last 3 --model.attention mha"
launch() { echo torchrun --standalone --nproc-per-node 2 -m sasformer train $c --out_dir $R/$1; }
run2() { name=$1; shift; timeout 170 $(launch $name) "$@" > $R/$name.log 2>&1; echo "$name rc=$? $(grep -c '"kind": "train"' $R/$name/metrics.jsonl 2>/dev/null) train records"; }
run2 ddp
run2 ddp_resumed --resume $R/ddp/checkpoints/step_000020
# a crash of the whole job (SIGKILL to torchrun and both workers) once its step-20 checkpoint is in place, then the same command (resume auto)
setsid $(launch ddp_killed) > $R/ddp_killed_first.log 2>&1 &
pid=$!; for i in $(seq 1 1500); do [ -d $R/ddp_killed/checkpoints/step_000020 ] && break; sleep 0.1; done
sleep 1; kill -9 -- -$pid; wait $pid 2>/dev/null; sleep 2
echo "killed after: $(grep '"kind": "train"' $R/ddp_killed/metrics.jsonl | tail -1 | cut -c1-40); leftover workers: $(pgrep -fc 'sasformer train' || true)"
cp $R/ddp_killed/metrics.jsonl $R/ddp_killed_before_kill.jsonl
run2 ddp_killed
run2 fsdp_bf16 --parallel fsdp --residual_dtype compute
run2 fsdp_bf16_resumed --parallel fsdp --residual_dtype compute --resume $R/fsdp_bf16/checkpoints/step_000020
python3 - "$R" <<'PY'
import json, sys, pathlib
R = pathlib.Path(sys.argv[1])
def losses(path):
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = r["loss"]  # a resumed run's records after the resume point overwrite the earlier ones
    return out
def compare(a_name, b_name, a, b, after=20):
    common = [s for s in sorted(a) if s > after and s in b]
    if not common:
        print(f"{b_name} vs {a_name}: nothing to compare"); return
    print(f"{b_name} vs {a_name}: steps {common[0]}-{common[-1]}, first step equal {a[common[0]] == b[common[0]]}, "
          f"max rel diff {max(abs(a[s] - b[s]) / abs(a[s]) for s in common):.2e}")
ddp = losses(R / "ddp/metrics.jsonl")
compare("ddp", "ddp_resumed", ddp, losses(R / "ddp_resumed/metrics.jsonl"))
compare("ddp", "ddp_killed (after resume)", ddp, losses(R / "ddp_killed/metrics.jsonl"))
before = losses(R / "ddp_killed_before_kill.jsonl")
compare("ddp_killed before the kill", "ddp_killed after resume", before, losses(R / "ddp_killed/metrics.jsonl"))
f = losses(R / "fsdp_bf16/metrics.jsonl")
compare("fsdp_bf16", "fsdp_bf16_resumed", f, losses(R / "fsdp_bf16_resumed/metrics.jsonl"))
print("losses every 5 steps, ddp fp32 stream:", [round(ddp[s], 4) for s in sorted(ddp)][::5])
print("losses every 5 steps, fsdp bf16 stream:", [round(f[s], 4) for s in sorted(f)][::5])
PY
