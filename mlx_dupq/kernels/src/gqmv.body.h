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
//         equal to the launch's threadgroup size; TG / ROWS must be a power of two).
// launch  grid (ceil(O / ROWS) * TG, 1, 1), threadgroup (TG, 1, 1). N % 32 == 0.
//
// Work split: the threadgroup's ROWS rows run at once, LPR = TG / ROWS lanes per row; lane l
// takes the row's 32-weight chunks l, l + LPR, ... A lane loads a chunk's 32 activations into
// registers once per x row (shared by every copy/expert slot) and the chunk's `bits` code words
// once (bit widths 1-8 are compiled as separate cases, so the 32 codes are unpacked from
// registers), then the lanes of each row sum their partials in a shared-memory tree.
//
// Binary codes: row o of expert e starts at word woff + o * (N/32) * bits; code i sits at bits
// [i*bits, (i+1)*bits) of that row's little-endian stream. Ternary: row o starts at byte
// woff*4 + o*ceil(N/5); code i is trit i%5 of byte i/5.
// x staged in shared memory with one pad float after every 32 (element i at DQ_XI(i)): lane l
// reads its chunk at 33 * l + k, so the lanes of a row hit different banks (unpadded, every lane
// would read bank k at once: a 32-way conflict)
#define DQ_XI(i) ((i) + ((i) >> 5))
DQ_SHARED float xs[DQ_CAP(XS ? M * N + M * N / 32 : 1, 67584)];
DQ_SHARED float red[DQ_CAP((SUM ? M : M * J) * TG, 65536)];
const int tid = DQ_TID;
const int slots = SUM ? M : M * J;
const int nchunk = N / 32;
const int LPR = TG / ROWS;  // lanes per output row
const int lane = tid % LPR;
const int o = DQ_GID * ROWS + tid / LPR;  // this thread's output row (may be >= O: idle)

if (XS) {
  for (int e = tid; e < M * N; e += TG) {
    float v = DQ_F32(x[e]);
    if (HAD > 0) {
      v *= signs[e % N];
    }
    xs[DQ_XI(e)] = v;
  }
  DQ_BARRIER();
  // in-place fast Walsh-Hadamard butterflies, blocks of HAD (Sylvester order)
  for (int h = 1; h < HAD; h *= 2) {
    for (int p = tid; p < M * (N / 2); p += TG) {
      const int m = p / (N / 2);
      const int q = p % (N / 2);
      const int i0 = m * N + (q / h) * (2 * h) + (q % h);
      const float a = xs[DQ_XI(i0)];
      const float b = xs[DQ_XI(i0 + h)];
      xs[DQ_XI(i0)] = a + b;
      xs[DQ_XI(i0 + h)] = a - b;
    }
    DQ_BARRIER();
  }
}
const float xscale = HAD > 0 ? DQ_RSQRT(DQ_F32(HAD)) : 1.0f;

// The dot of one chunk's 32 codes of bit width B (a compile-time constant) with xr: the chunk's
// B words are read once; code k sits at bits [k*B, (k+1)*B) of them (may straddle two words).
#define DQ_BINARY_CHUNK(B)                                                         \
  {                                                                                \
    const int base = woff + (o * nchunk + c) * (B);                                \
    dq_u32 wv[(B) + 1];                                                            \
    DQ_UNROLL for (int t = 0; t < (B); ++t) {                                      \
      wv[t] = w[base + t];                                                         \
    }                                                                              \
    wv[B] = 0u;                                                                    \
    DQ_UNROLL for (int k = 0; k < 32; ++k) {                                       \
      const int bit = k * (B);                                                     \
      const dq_u32 q = dq_stream_code(wv[bit >> 5], wv[(bit >> 5) + 1], bit & 31, (B)); \
      qx += DQ_F32(q) * xr[k];                                                     \
    }                                                                              \
  }

float part[DQ_CAP(SUM ? M : M * J, 64)];
DQ_UNROLL for (int s = 0; s < slots; ++s) {
  part[s] = 0.0f;
}
if (o < O) {
  for (int c = lane; c < nchunk; c += LPR) {
    const int i0 = c * 32;
    DQ_UNROLL for (int m = 0; m < M; ++m) {
      float xr[32];
      float xsum = 0.0f;
      DQ_UNROLL for (int k = 0; k < 32; ++k) {
        xr[k] = XS ? xs[DQ_XI(m * N + i0 + k)] : DQ_F32(x[m * N + i0 + k]);
        xsum += xr[k];
      }
      DQ_UNROLL for (int j = 0; j < J; ++j) {
        const int e = idx[m * J + j];
        const int bits = meta[e * 4 + 0];
        const int g = meta[e * 4 + 1];
        const int woff = meta[e * 4 + 2];
        const int sidx = meta[e * 4 + 3] + o * (N / g) + i0 / g;
        const float sc = DQ_F32(scales[sidx]);
        const float bi = DQ_F32(biases[sidx]);
        float qx = 0.0f;
        if (bits == 0) {
          // base-3 bytes: code i is trit i % 5 of byte i / 5 of the row; the chunk's <= 8 bytes
          // lie in at most 3 consecutive words, read once
          const int r0 = i0 % 5;
          const int b0 = woff * 4 + o * ((N + 4) / 5) + i0 / 5;
          const int wa = b0 >> 2;
          const int nw = ((b0 + (r0 + 31) / 5) >> 2) - wa;
          const dq_u32 t0 = w[wa];
          const dq_u32 t1 = nw >= 1 ? w[wa + 1] : 0u;
          const dq_u32 t2 = nw >= 2 ? w[wa + 2] : 0u;
          DQ_UNROLL for (int k = 0; k < 32; ++k) {
            const int rel = (b0 & 3) + (r0 + k) / 5;
            const dq_u32 word = rel < 4 ? t0 : (rel < 8 ? t1 : t2);
            qx += DQ_F32(dq_trit(dq_byte(word, rel & 3), (r0 + k) % 5)) * xr[k];
          }
        } else {
          switch (bits) {
            case 1: DQ_BINARY_CHUNK(1) break;
            case 2: DQ_BINARY_CHUNK(2) break;
            case 3: DQ_BINARY_CHUNK(3) break;
            case 4: DQ_BINARY_CHUNK(4) break;
            case 5: DQ_BINARY_CHUNK(5) break;
            case 6: DQ_BINARY_CHUNK(6) break;
            case 7: DQ_BINARY_CHUNK(7) break;
            default: DQ_BINARY_CHUNK(8) break;
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
}
#undef DQ_BINARY_CHUNK
#undef DQ_XI

// tree reduction over each row's LPR lanes (adjacent threads), all slots at once; every thread
// of the group takes part (idle rows add zeros), so the barriers are uniform
DQ_UNROLL for (int s = 0; s < slots; ++s) {
  red[s * TG + tid] = part[s];
}
DQ_BARRIER();
for (int stride = LPR / 2; stride > 0; stride /= 2) {
  if (lane < stride) {
    DQ_UNROLL for (int s = 0; s < slots; ++s) {
      red[s * TG + tid] += red[s * TG + tid + stride];
    }
  }
  DQ_BARRIER();
}
if (lane == 0 && o < O) {
  DQ_UNROLL for (int s = 0; s < slots; ++s) {
    y[s * O + o] = DQ_CAST(T, red[s * TG + tid] * xscale);
  }
}
