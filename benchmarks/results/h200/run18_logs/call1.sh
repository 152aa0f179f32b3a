# run 18, call 1: the compiled model rows missing from run 17's table, both lengths, one machine
. .carry/common.sh
V=mha,gqa,mqa,mla,tpa,sas_24x128_reference,sas_24x128
timeout 300 python3 benchmarks/sas_speed.py --out $R/model1024 --sections check,model --seq-lens 1024 \
  --budget-s 255 --variants $V --compiled-variants $V --modes compiled > $R/model_T1024.log 2>&1
echo "model 1024 rc=$?"; grep -E "^\| 1024" $R/model1024/sas_speed.md
V4=mha,gqa,mqa,mla,tpa,sas_24x128_reference
timeout 265 python3 benchmarks/sas_speed.py --out $R/model4096 --sections model --seq-lens 4096 \
  --budget-s 225 --variants $V4 --compiled-variants $V4 --modes compiled > $R/model_T4096.log 2>&1
echo "model 4096 rc=$?"; grep -E "^\| 4096" $R/model4096/sas_speed.md
grep -h WARNING $R/*.log | head
