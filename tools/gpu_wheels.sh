#!/usr/bin/env bash
# The wheels the GPU machine lacks, for gpu_check.py, into .whl/ (ignored by git): its Python is 3.12 with
# torch 2.11, transformers 5.17 and huggingface-hub 1.33, and no bitsandbytes, liger-kernel, trl or
# math-verify. The versions are the ones requirements.txt installs here, so the GPU runs what CI tests.
# The working tree and these wheels travel together and must stay under 64 MiB: the script prints both.
#   bash tools/gpu_wheels.sh     (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: .whl/ travels with the working tree
rm -rf .whl && mkdir -p .whl
WHEELS=(
  bitsandbytes==0.50.2          # 8-bit AdamW's CUDA kernels (about 43 MB)
  liger-kernel==0.8.5           # --liger
  transformers==5.25.0          # requirements.txt asks for >= 5.23
  trl==1.16.0                   # bench.py's side-by-side comparison
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # trl imports datasets
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2  # rewards.py
)
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$spec" 2>&1 | grep -v "is ignored: it is neither" || true
done
ls -l .whl | awk 'NR > 1 {print $5, $9}'
wheels=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
awk -v w="$wheels" -v t="$tree" 'BEGIN {m = 1048576; printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit 64)\n", w / m, t / m, (w + t) / m}' 
[ $((wheels + tree)) -lt $((64 * 1024 * 1024)) ] || { echo "over 64 MiB: drop a wheel or shrink the tree" >&2; exit 1; }
