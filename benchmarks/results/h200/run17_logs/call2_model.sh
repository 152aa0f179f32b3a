# call 2 (SEQ=1024): the model table at one length (SEQ), loss in the forward as the trainer computes it
. .carry/common.sh
V=mha,sas_24x128,sas_24x128_blocked,sas_24x64,sas_24x128_reference,gqa,mqa,mla,tpa,sas_24x128_blocked32
C=mha,sas_24x128,sas_24x128_blocked,sas_24x64,sas_24x128_reference,sas_24x128_blocked32
timeout ${TMO:-575} python3 benchmarks/sas_speed.py --out $R/model --sections check,model --seq-lens $SEQ \
  --budget-s ${BUDGET:-525} --variants $V --compiled-variants $C --modes eager,compiled > $R/model_T$SEQ.log 2>&1
echo "model rc=$?"
tail -30 $R/model/sas_speed.md
