#!/usr/bin/env bash
# On the GPU machine: copy the chunks this call carried (.gpu_assets/*/) to /tmp/parts and list what is there.
mkdir -p /tmp/parts && for d in .gpu_assets/*/; do cp "$d"* /tmp/parts/ 2>/dev/null; done
ls /tmp/parts | tr '\n' ' '; echo
