#!/bin/bash
# session-4 GPU call A: kernel tests, generate() benchmark (64k and a host-bound 2k floor), profile
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/results
(python3 -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tail -5) | tee $OUT/tests.log
python3 benchmarks/bench_generate.py --out $OUT/results 2>&1 | tee $OUT/gen64k.log | grep -v "^{"
python3 benchmarks/bench_generate.py --context 2048 --out $OUT/results 2>&1 | tee $OUT/gen2k.log | grep -v "^{"
python3 benchmarks/bench_generate.py --layers 4 --profile > $OUT/profile.log 2>&1
grep -E "Self CPU time total|Self CUDA time total|===" $OUT/profile.log
