#!/usr/bin/env bash
# launch.sh NAME 'command' : run detached in benchmarks/, log to ~/res/NAME.log, exit code to ~/res/NAME.rc
name=$1; shift
mkdir -p ~/res
rm -f ~/res/$name.rc
: > ~/res/$name.log  # before detaching, so a poll right after sees the job
setsid nohup bash -c "cd $REPO/benchmarks && export ATTNSWAP_COMMIT=$ATTNSWAP_COMMIT && ( $* ) > ~/res/$name.log 2>&1; echo \$? > ~/res/$name.rc" > /dev/null 2>&1 &
echo "launched $name"
