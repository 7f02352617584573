#!/bin/sh
# Build the CPU harness: mlx_dupq/kernels/src/build_cpu.sh OUT.so  (the tests call this via mlx_dupq.kernels.cpu)
set -e
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/build/libdq_cpu.so"}
mkdir -p "$(dirname "$out")"
${CXX:-g++} -std=c++17 -O1 -g -fPIC -shared -Wall -Wextra -Wno-unused-parameter -Werror \
  -I"$here" "$here/cpu_harness.cpp" -o "$out"
