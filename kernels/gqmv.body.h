// gqmv: dequantized GEMV / small-batch GEMM over gathered copies or experts, with an
// optional fused randomized block Hadamard on the activation. Body only (see dq_portable.h).
//
// inputs  x      (M, N) T             activations (read once per threadgroup)
//         w      flat uint32          packed weights of E experts/copies, concatenated
//         scales flat T               per-group scales of every expert, concatenated
//         biases flat T               per-group offsets (symmetric: the implied -s*(L-1)/2)
//         meta   (E, 4) int32         per expert: bits (0 = ternary), group, word offset, scale offset
//         idx    (M, J) int32         expert of slot j for row m
//         coef   (M, J) float32       weight of slot j for row m
//         signs  (N,) float32         +-1 randomized-Hadamard signs (read only when HAD > 0)
// output  y      (M, SUM ? 1 : J, O) T
// templates T; ints N, O, M, J, SUM (1: y[m] = sum_j coef W_idx x; 0: one output per slot),
//         ROWS (output rows per threadgroup), HAD (Hadamard block, power of two; 0 = none),
//         XS (1: stage x in shared memory, required when HAD > 0), TG (threads per group,
//         power of two, equal to the launch's threadgroup size).
// launch  grid (ceil(O / ROWS) * TG, 1, 1), threadgroup (TG, 1, 1). N % 32 == 0.
//
// Binary codes: row o of expert e starts at word woff + o * (N/32) * bits; code i sits at bits
// [i*bits, (i+1)*bits) of that row's little-endian stream. Ternary: row o starts at byte
// woff*4 + o*ceil(N/5); code i is trit i%5 of byte i/5.
DQ_SHARED float xs[DQ_CAP(XS ? M * N : 1, 65536)];
DQ_SHARED float red[DQ_CAP((SUM ? M : M * J) * TG, 65536)];
const int tid = DQ_TID;
const int slots = SUM ? M : M * J;
const int nchunk = N / 32;

if (XS) {
  for (int e = tid; e < M * N; e += TG) {
    float v = DQ_F32(x[e]);
    if (HAD > 0) {
      v *= signs[e % N];
    }
    xs[e] = v;
  }
  DQ_BARRIER();
  // in-place fast Walsh-Hadamard butterflies, blocks of HAD (Sylvester order)
  for (int h = 1; h < HAD; h *= 2) {
    for (int p = tid; p < M * (N / 2); p += TG) {
      const int m = p / (N / 2);
      const int q = p % (N / 2);
      const int i0 = m * N + (q / h) * (2 * h) + (q % h);
      const float a = xs[i0];
      const float b = xs[i0 + h];
      xs[i0] = a + b;
      xs[i0 + h] = a - b;
    }
    DQ_BARRIER();
  }
}
const float xscale = HAD > 0 ? DQ_RSQRT(DQ_F32(HAD)) : 1.0f;

for (int r = 0; r < ROWS; ++r) {
  const int o = DQ_GID * ROWS + r;
  if (o >= O) {
    break;  // uniform across the threadgroup
  }
  float part[DQ_CAP(SUM ? M : M * J, 64)];
  for (int s = 0; s < slots; ++s) {
    part[s] = 0.0f;
  }
  for (int c = tid; c < nchunk; c += TG) {
    const int i0 = c * 32;
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < J; ++j) {
        const int e = idx[m * J + j];
        const int bits = meta[e * 4 + 0];
        const int g = meta[e * 4 + 1];
        const int woff = meta[e * 4 + 2];
        const int sidx = meta[e * 4 + 3] + o * (N / g) + i0 / g;
        const float sc = DQ_F32(scales[sidx]);
        const float bi = DQ_F32(biases[sidx]);
        float qx = 0.0f;
        float xsum = 0.0f;
        if (bits == 0) {
          const int base = woff * 4 + o * ((N + 4) / 5);
          for (int k = 0; k < 32; ++k) {
            const int i = i0 + k;
            const int b = base + i / 5;
            const dq_u32 q = dq_trit(dq_byte(w[b >> 2], b & 3), i % 5);
            const float xv = XS ? xs[m * N + i] : DQ_F32(x[m * N + i]);
            qx += DQ_F32(q) * xv;
            xsum += xv;
          }
        } else {
          const int base = woff + (o * nchunk + c) * bits;
          for (int k = 0; k < 32; ++k) {
            const int bit = k * bits;
            const int wi = base + (bit >> 5);
            const int off = bit & 31;
            const dq_u32 lo = w[wi];
            const dq_u32 hi = (off + bits > 32) ? w[wi + 1] : 0u;
            const dq_u32 q = dq_stream_code(lo, hi, off, bits);
            const float xv = XS ? xs[m * N + i0 + k] : DQ_F32(x[m * N + i0 + k]);
            qx += DQ_F32(q) * xv;
            xsum += xv;
          }
        }
        const float dot = coef[m * J + j] * (sc * qx + bi * xsum);
        if (SUM) {
          part[m] += dot;
        } else {
          part[m * J + j] += dot;
        }
      }
    }
  }
  // tree reduction over the threadgroup, all slots at once
  for (int s = 0; s < slots; ++s) {
    red[s * TG + tid] = part[s];
  }
  DQ_BARRIER();
  for (int stride = TG / 2; stride > 0; stride /= 2) {
    if (tid < stride) {
      for (int s = 0; s < slots; ++s) {
        red[s * TG + tid] += red[s * TG + tid + stride];
      }
    }
    DQ_BARRIER();
  }
  if (tid == 0) {
    for (int s = 0; s < slots; ++s) {
      y[s * O + o] = DQ_CAST(T, red[s * TG] * xscale);
    }
  }
  DQ_BARRIER();  // red is reused by the next row
}
