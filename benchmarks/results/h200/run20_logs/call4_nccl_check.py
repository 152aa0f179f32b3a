# run 20, call 4 (2 H200s, git 3f35de6, where distributed.on_every_rank existed; withdrawn since): object
# collectives over NCCL
#   PYTHONPATH=$PWD timeout -k 5 45 torchrun --standalone --nproc-per-node 2 call4_nccl_check.py
from sasformer.train import distributed as D

info, device = D.init_distributed("auto")
print("rank", info.rank, device, D.broadcast_object({"from": info.rank}), D.all_gather_object(info.rank),
      D.on_every_rank(lambda: info.rank * 10), flush=True)
try:
    D.on_every_rank(lambda: 1 / 0 if info.rank == 1 else 0)
except Exception as e:
    print("rank", info.rank, type(e).__name__, e, flush=True)
D.shutdown()
