# Sourced by benchmarks/gpu.sh and benchmarks/campaign.sh with OUTDIR as $1: makes OUTDIR (absolute path in $out),
# moves to the repository root and sets what a plain copy on a GPU machine needs (nothing installed, no .git):
# PYTHONPATH=., SRA_GIT_COMMIT (the commit the results record), unbuffered output; writes OUTDIR/env.txt.
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export SRA_GIT_COMMIT="${SRA_GIT_COMMIT:-$(git describe --always --dirty --abbrev=40 2>/dev/null || echo unknown)}"
export PYTHONUNBUFFERED=1
{ nvidia-smi 2>&1; echo "commit: $SRA_GIT_COMMIT"; python3 -m sra_kernels; } > "$out/env.txt" 2>&1
