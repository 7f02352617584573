// cpu_harness.cpp -- runs the GPU kernel bodies on the CPU, unchanged.
//
// Each threadgroup's TG threads run as cooperative coroutines (ucontext) on one OS thread:
// a thread runs until it reaches DQ_BARRIER() or returns; when every live thread waits at
// the barrier, all are released. Threadgroups run one after another. Shared memory
// (DQ_SHARED = static) is one copy per kernel. A threadgroup in which some threads finish
// while others wait at a barrier is reported as an error (on a GPU that is a hang or UB).
//
// C ABI, one function per kernel; returns 0, or a negative error code:
//   -1 divergent barrier, -2 a size exceeds the CPU capacity of a shared/local array,
//   -3 bad launch parameters.
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>
#include <ucontext.h>

#include "dq_portable.h"

namespace {

enum State { RUNNABLE, WAITING, DONE };

struct Scheduler {
  ucontext_t main_ctx;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> state;
  int cur = 0, gid = 0, tpg = 0;
  std::function<void()> body;
};

Scheduler S;
std::mutex run_mutex;
long w_reads = 0;

// A read-only buffer that counts its element reads (the body's w[i] reads the packed weights).
template <typename V>
struct Counted {
  const V* data;
  V operator[](long i) const {
    ++w_reads;
    return data[i];
  }
};
constexpr size_t kStack = 256 * 1024;

void trampoline() {
  S.body();
  S.state[S.cur] = DONE;  // uc_link returns to the scheduler
}

int run_grid(int ngroups, int tpg, std::function<void()> body) {
  if (ngroups < 0 || tpg <= 0 || tpg > 1024) return -3;
  S.body = std::move(body);
  S.tpg = tpg;
  S.ctx.resize(tpg);
  S.state.assign(tpg, RUNNABLE);
  if ((int)S.stacks.size() < tpg) S.stacks.resize(tpg);
  for (auto& st : S.stacks) st.resize(kStack);
  for (int g = 0; g < ngroups; ++g) {
    S.gid = g;
    for (int t = 0; t < tpg; ++t) {
      getcontext(&S.ctx[t]);
      S.ctx[t].uc_stack.ss_sp = S.stacks[t].data();
      S.ctx[t].uc_stack.ss_size = kStack;
      S.ctx[t].uc_link = &S.main_ctx;
      makecontext(&S.ctx[t], trampoline, 0);
      S.state[t] = RUNNABLE;
    }
    for (;;) {
      for (int t = 0; t < tpg; ++t) {
        if (S.state[t] == RUNNABLE) {
          S.cur = t;
          swapcontext(&S.main_ctx, &S.ctx[t]);
        }
      }
      int done = 0, waiting = 0;
      for (int t = 0; t < tpg; ++t) {
        done += S.state[t] == DONE;
        waiting += S.state[t] == WAITING;
      }
      if (done == tpg) break;
      if (done > 0) return -1;  // some threads left while others wait at a barrier
      for (int t = 0; t < tpg; ++t) S.state[t] = RUNNABLE;  // everyone arrived: release
    }
  }
  return 0;
}

}  // namespace

int dq_cpu_tid() { return S.cur; }
int dq_cpu_gid() { return S.gid; }
int dq_cpu_tpg() { return S.tpg; }
void dq_cpu_barrier() {
  S.state[S.cur] = WAITING;
  swapcontext(&S.ctx[S.cur], &S.main_ctx);
}

extern "C" {

int dq_cpu_abi_version() { return 2; }

// Number of reads of the packed weights `w` by the last dq_cpu_gqmv call (every thread's).
long dq_cpu_w_reads() { return w_reads; }

// p = {N, O, M, J, SUM, ROWS, HAD, XS, TG}; x, scales, biases, y are float32.
int dq_cpu_gqmv(const float* x, const uint32_t* w_data, const float* scales, const float* biases,
                const int32_t* meta, const int32_t* idx, const float* coef, const float* signs,
                float* y, const int32_t* p) {
  using T = float;
  const Counted<uint32_t> w{w_data};
  const int N = p[0], O = p[1], M = p[2], J = p[3], SUM = p[4], ROWS = p[5], HAD = p[6],
            XS = p[7], TG = p[8];
  const int slots = SUM ? M : M * J;
  if (N % 32 || O <= 0 || M <= 0 || J <= 0 || ROWS <= 0 || TG <= 0 || TG % ROWS) return -3;
  if ((TG / ROWS) & (TG / ROWS - 1)) return -3;  // lanes per row: a power of two
  if ((XS && M * N + M * N / 32 > 67584) || slots > 64 || slots * TG > 65536) return -2;
  if (HAD > 0 && (!XS || (HAD & (HAD - 1)) || N % HAD)) return -3;
  std::lock_guard<std::mutex> lock(run_mutex);
  w_reads = 0;
  auto body = [&]() {
#include "gqmv.body.h"
  };
  return run_grid((O + ROWS - 1) / ROWS, TG, body);
}

}  // extern "C"
