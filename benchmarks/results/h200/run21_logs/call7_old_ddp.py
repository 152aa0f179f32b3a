"""train_speed.py with the trainer's earlier DDP form: torch.compile around DDP instead of inside it."""
import runpy
import sys

import torch

from sasformer.train import distributed as D
from sasformer.train import trainer as T


def around(self):
    module, ddp = self._loss_model(), None
    if self.dist.enabled:
        module = ddp = D.apply_ddp(module, self.device)
    if self.config.compile and self.compile_scope == "model":
        module = torch.compile(module, **self._compile_kwargs())
    return module, ddp


T.Trainer._parallelize = around
sys.argv = ["benchmarks/train_speed.py", *sys.argv[1:]]
runpy.run_path("benchmarks/train_speed.py", run_name="__main__")
