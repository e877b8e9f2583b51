#!/usr/bin/env bash
# poll.sh SECONDS NAME... : wait until every job NAME (launch.sh) has an exit code or SECONDS pass, print
# each job's last lines, and pack logs, JSON results and calibration plots into $OUT/res.tgz.
# A machine with none of these jobs' logs (the lent one was released and this call got a fresh one) exits 3
# at once instead of waiting out SECONDS.
limit=$1; shift
seen=0
for n in "$@"; do [ -f ~/res/$n.log ] && seen=1; done
if [ $seen -eq 0 ]; then echo "FRESH MACHINE: none of the jobs' logs is here; they were lost with the last one"; exit 3; fi
t0=$(date +%s)
while :; do
  left=0
  for n in "$@"; do [ -f ~/res/$n.rc ] || left=$((left+1)); done
  [ $left -eq 0 ] && break
  [ $(( $(date +%s) - t0 )) -ge $limit ] && break
  sleep 5
done
echo "--- after $(( $(date +%s) - t0 )) s, $left running"
for n in "$@"; do
  echo "=== $n rc=$(cat ~/res/$n.rc 2>/dev/null || echo running)"
  tail -c 3000 ~/res/$n.log 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | grep -v '^\[transformers\]' | tail -${TAILN:-6}
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
if [ -n "$OUT" ]; then
  mkdir -p ~/res/png; for d in ~/runs/*/; do [ -f $d/calibration.png ] && cp $d/calibration.png ~/res/png/$(basename $d).png; done
  cd ~/res && tar -czf $OUT/res.tgz *.log *.json png $(ls -d traces 2>/dev/null) 2>/dev/null; ls -la $OUT
fi
