// dq_portable.h -- the one header every mlx-dupq kernel body is written against.
//
// The same body text (kernels/*.body.h) compiles in three modes:
//   Metal : passed as `header` to mx.fast.metal_kernel; __METAL_VERSION__ is defined.
//           The Metal source generator only declares the thread-position attributes a body
//           names literally, so the Python wrapper prepends DQ_METAL_PROLOGUE's text
//           (see mlx_dupq/kernels/gpu.py) to the body.
//   CUDA  : passed as `header` to mx.fast.cuda_kernel (NVRTC); __CUDACC__ / __CUDACC_RTC__.
//   CPU   : included by kernels/cpu_harness.cpp (g++), which runs every threadgroup's
//           threads as cooperative coroutines, so barriers and shared memory behave as
//           on a GPU with a sequential, deterministic schedule.
//
// Bodies may use: DQ_TID, DQ_GID, DQ_TPG (x-dimension thread/threadgroup index and size),
// DQ_SHARED (threadgroup / __shared__ storage), DQ_BARRIER(), DQ_F32(v) (to float),
// DQ_CAST(T, v) (from float), dq_u32 / dq_i32, DQ_FN (helper-function qualifier), DQ_UNROLL
// (before a loop with a compile-time trip count: unroll it fully, so that small arrays indexed
// by the loop counter stay in registers), and the bit helpers below. No warp/simdgroup intrinsics: they cannot be emulated faithfully here.
#ifndef DQ_PORTABLE_H
#define DQ_PORTABLE_H

#if defined(__METAL_VERSION__)
#define DQ_BACKEND_METAL 1
typedef uint dq_u32;
typedef int dq_i32;
#define DQ_FN inline
#define DQ_TID ((int)dq_tid3.x)
#define DQ_GID ((int)dq_gid3.x)
#define DQ_TPG ((int)dq_tpg3.x)
#define DQ_SHARED threadgroup
#define DQ_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define DQ_RSQRT(v) metal::rsqrt(v)
#define DQ_UNROLL _Pragma("clang loop unroll(full)")  // as mlx's own Metal kernels (utils.h)
#elif defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DQ_BACKEND_CUDA 1
typedef unsigned int dq_u32;
typedef int dq_i32;
#define DQ_FN __device__ inline
#define DQ_TID ((int)threadIdx.x)
#define DQ_GID ((int)blockIdx.x)
#define DQ_TPG ((int)blockDim.x)
#define DQ_SHARED __shared__
#define DQ_BARRIER() __syncthreads()
#define DQ_RSQRT(v) rsqrtf(v)
#define DQ_UNROLL _Pragma("unroll")
#else
#define DQ_BACKEND_CPU 1
#include <cmath>
#include <cstdint>
typedef uint32_t dq_u32;
typedef int32_t dq_i32;
#define DQ_FN inline
int dq_cpu_tid();
int dq_cpu_gid();
int dq_cpu_tpg();
void dq_cpu_barrier();
#define DQ_TID dq_cpu_tid()
#define DQ_GID dq_cpu_gid()
#define DQ_TPG dq_cpu_tpg()
// one copy per kernel function, shared by the coroutines of the running threadgroup
#define DQ_SHARED static
#define DQ_BARRIER() dq_cpu_barrier()
#define DQ_RSQRT(v) (1.0f / std::sqrt(v))
#define DQ_UNROLL _Pragma("GCC unroll 32")
#endif

// Size of a shared/local array: the template expression on a GPU, a fixed capacity on the
// CPU (where template constants are run-time values; the harness checks the capacity).
#ifdef DQ_BACKEND_CPU
#define DQ_CAP(expr, cpu_max) (cpu_max)
#else
#define DQ_CAP(expr, cpu_max) (expr)
#endif

#define DQ_F32(v) static_cast<float>(v)
#define DQ_CAST(T, v) static_cast<T>(v)

// Code `k` of a little-endian bit stream of `bits`-wide codes (mlx's affine layout): the
// caller passes the 32-bit word holding bit k*bits (`lo`) and the next word (`hi`, read
// only when the code straddles the two).
DQ_FN dq_u32 dq_stream_code(dq_u32 lo, dq_u32 hi, int off, int bits) {
  dq_u32 v = lo >> off;
  if (off + bits > 32) {
    v |= hi << (32 - off);
  }
  return v & ((1u << bits) - 1u);
}

// Byte `b` (little-endian) of a buffer of 32-bit words.
DQ_FN dq_u32 dq_byte(dq_u32 word, int b) {
  return (word >> (8 * b)) & 0xFFu;
}

// Trit `k` (0..4) of a base-3 byte (sum q_k 3^k).
DQ_FN dq_u32 dq_trit(dq_u32 byte, int k) {
  dq_u32 p = 1u;
  for (int t = 0; t < k; ++t) {
    p *= 3u;
  }
  return (byte / p) % 3u;
}

#endif  // DQ_PORTABLE_H
