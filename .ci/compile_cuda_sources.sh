#!/usr/bin/env bash
# Compile every .cu under a directory (default: csrc/) with nvcc, compile only
# (no GPU needed).  The .cu files include no torch header, so this works against
# the CPU torch wheel.  Exits non-zero if nvcc is missing or any file fails.
set -u
root="${1:-csrc}"
nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc_bin=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc_bin" ]; then
  echo "compile_cuda_sources: nvcc not found" >&2
  exit 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
count=0
while IFS= read -r -d '' cu; do
  count=$((count + 1))
  if "$nvcc_bin" -std=c++17 -O3 -fmad=false -arch=sm_90 -I"$root" -I"$root/cuda" -c "$cu" -o "$out/$count.o" 2>"$out/err"; then
    echo "compile_cuda_sources: OK   $cu"
  else
    echo "compile_cuda_sources: FAIL $cu" >&2
    cat "$out/err" >&2
    status=1
  fi
done < <(find "$root" -name '*.cu' -print0 | sort -z)
echo "compile_cuda_sources: $count .cu file(s) checked with $("$nvcc_bin" --version | tail -1)"
exit $status
