#!/usr/bin/env bash
# On the lent GPU, second call: reassemble the model, install the wheels and attnswap, unpack the
# prebuilt --data general tokens (README.md here says what the first call stashed).
set -e
cd "$REPO"
t0=$(date +%s)
cat ~/stash/part_aa .gpu/b/part_a? > ~/smollm2.gguf
python3 -m pip install -q --no-deps .gpu/b/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
mkdir -p ~/.cache/attnswap ~/res ~/runs && tar -xf ~/stash/data.tar -C ~/.cache/attnswap/
ls ~/.cache/attnswap/data; ls -la ~/smollm2.gguf
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
echo "setup $(( $(date +%s) - t0 )) s"
