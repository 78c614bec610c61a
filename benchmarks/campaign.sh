#!/usr/bin/env bash
# The GPU campaign in one command of about 9 minutes: phases in priority order, each cut at its time budget,
# everything written under OUTDIR as it is measured (a phase cut short keeps what it measured).
#
#   benchmarks/campaign.sh OUTDIR            # on the lent GPU machine, from a plain copy (PYTHONPATH=.)
#   SRA_CAMPAIGN_DRY=1 benchmarks/campaign.sh OUTDIR   # anywhere: every phase with 20 s budgets (a CPU dry run)
#
# Phases (budget in seconds; SRA_CAMPAIGN_SCALE multiplies them all):
#   env      nvidia-smi, `python -m sra_kernels`, auto's plan of pvt_v2_b2 at 224 B64 and 512 B16 (explain.txt)
#   tests    the native test suite on 8 xdist workers when pytest-xdist is there                        150
#   ops      SRA op rows, bf16, pvt_v2_b2 stages at 224x224 B64 and 512x512 B16, fwd and fwd+bwd; providers
#            auto, sra_kernels, sra_kernels_projected, sdpa, and compiled at 512                           150
#   models   pvt_v2_b2 at 224 B64 and 512 B16, bf16 autocast, infer and train, auto / sra_kernels / sdpa,
#            eager                                                                                        80
#   split    a training step's time by module (attention, Mix-FFN, norms, ...; benchmarks/profile_model.py),
#            pvt_v2_b2 then mit_b2 at 512 B16, auto and sdpa (split_MODEL.txt and .json); its 40 s came
#            from ops (170 before) and graphs (120 before)                                                40
#   graphs   the models rows at 224 B64 under CUDA graphs (torch.compile reduce-overhead), auto, sdpa   100
#   profile  per-kernel profiler tables of every stage at 512 B16, triton and sdpa (profile_512.txt)      45
# Every phase NAME writes NAME.log; the benchmark phases also NAME.jsonl (rows as measured) and NAME.json.
#   report   report.md / speedups.png from every .jsonl                                                 15
#   policy   the policy table these rows alone would give (policy_table.json; commit the results, then
#            regenerate sra_kernels/policy_table.json from all of them)                                 15
# Exit status 0 when every phase finished inside its budget, 1 otherwise (the run still goes on).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
source "$(dirname "$0")/gpu_env.sh" "$1"
scale="${SRA_CAMPAIGN_SCALE:-1}"
status=0

budget() {  # seconds for a phase: its budget x scale, or 20 in a dry run
    if [ "${SRA_CAMPAIGN_DRY:-0}" = 1 ]; then echo 20; else python3 -c "print(int($1 * $scale))"; fi
}

phase() {  # phase NAME BUDGET COMMAND...: run COMMAND under its budget, its output in NAME.log; log time and status
    local name=$1 seconds
    seconds=$(budget "$2")
    shift 2
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=$?
    echo "phase $name: rc $rc, $((SECONDS - start)) s of $seconds" | tee -a "$out/phases.log"
    [ $rc -eq 0 ] || status=1
}

bench() {  # the pytest benchmarks/ command of phase NAME: its rows land in NAME.jsonl as they are measured
    echo python3 -m pytest benchmarks -q -p no:cacheprovider --rows-jsonl="$out/$1.jsonl" \
        --benchmark-json="$out/$1.json" --benchmark-columns=median,rounds
}

{ python3 -m sra_kernels --explain pvt_v2_b2 --img-size 224 224 --batch 64 --train
  python3 -m sra_kernels --explain pvt_v2_b2 --img-size 512 512 --batch 16 --train; } > "$out/explain.txt" 2>&1

workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
phase tests 150 python3 -m pytest tests -q -rfE -p no:cacheprovider $workers

phase ops 150 $(bench ops) -k "test_sra_op and bf16 and (224x224 or 512x512) and not reference and not cls \
    and not (compiled and 224x224)"

phase models 80 $(bench models) -k "test_model and pvt_v2_b2 and bf16-autocast \
    and (auto-eager or sra_kernels-eager or sdpa-eager)"

phase split 40 bash -c 'for model in pvt_v2_b2 mit_b2; do
    python3 -m benchmarks.profile_model "$0/split_$model.txt" --model $model --img-size 512 --batch 16 \
        --backend auto sdpa --steps 3 --json "$0/split_$model.json" || rc=1; done; exit ${rc:-0}' "$out"

phase graphs 100 $(bench graphs) -k "test_model and pvt_v2_b2 and 224x224 and bf16-autocast \
    and (auto-graphs or sdpa-graphs)"

phase profile 45 python3 -m benchmarks.profile_stages "$out/profile_512.txt" --image 512 --batch 16

jsonl=$(ls "$out"/*.jsonl 2>/dev/null)
if [ -n "$jsonl" ]; then
    phase report 15 python3 -m benchmarks.report $jsonl --out "$out"
    phase policy 15 python3 -m benchmarks.policy_table "$out" --out "$out/policy_table.json"
fi
echo "campaign.sh: wrote $out; status $status" | tee -a "$out/phases.log"
exit $status
