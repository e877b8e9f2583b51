#!/usr/bin/env bash
# wait.sh NAME... : block until every job NAME (launch.sh) has written its exit code
for n in "$@"; do while [ ! -f ~/res/$n.rc ]; do sleep 5; done; done
