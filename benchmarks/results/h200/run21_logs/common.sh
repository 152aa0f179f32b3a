# sourced by the call scripts: environment, revision and GPU state, and a tarball of everything at exit
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=/tmp/res; rm -rf $R; mkdir -p $R
{ git log -1 --format='%H %s'; git status --short; python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())';
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv; } > $R/env.txt 2>&1
finish() { cd $R && tar czf $OUT/all.tgz . ; cp $R/*.log $OUT/ 2>/dev/null; }
trap finish EXIT
