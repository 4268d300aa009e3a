// The GroupNorm + SiLU loops, written once and compiled once per instruction set: each csrc/cpu/group_norm_silu_*.cpp
// file includes its system headers, switches the target (#pragma GCC target) and includes this file inside its own
// namespace, so every function here exists once per instruction set and nothing here is shared between them.
// The loops use the compilers' generic vectors (GN_LANES floats, the target's register width), bf16 by
// bit shifts, exp by range reduction and a polynomial (no calls). Include only from those files.
//
// Expects: <cstdint>, <cstring>, <c10/util/Half.h> included, GN_KERNELS_NAME the name of the table's getter,
// GN_LANES the vector width in floats and optionally GN_RECIPROCAL(d), a reciprocal estimate of a vector.

#define VEC_LANES GN_LANES
#include "vector_io.h"
#undef VEC_LANES

// ------------------------------------------------------------------------------------------------ activation
// exp(z) for z clamped to [-88, 88] (NaN stays NaN): z = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial (relative error below 2e-7), 2^n built in the exponent bits. No float -> int conversion: the
// integer n sits in the low mantissa bits of k = z log2(e) + 1.5 * 2^23. The scalar form (for tails) and the
// vector form do the same operations.
constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.3981999507e-3f, kP1 = 8.3334519073e-3f, kP2 = 4.1665795894e-2f, kP3 = 1.6666665459e-1f,
                kP4 = 5.0000001201e-1f;

inline float exp_clamped(float z) {
  z = z > 88.0f ? 88.0f : z;
  z = z < -88.0f ? -88.0f : z;
  const float k = z * kLog2e + kShifter;
  const float n = k - kShifter;
  const float r = (z - n * kLn2Hi) - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r * r + r + 1.0f;
  uint32_t kbits;
  std::memcpy(&kbits, &k, sizeof kbits);
  const uint32_t pow_bits = (kbits + 127u) << 23;  // 2^n (|n| <= 127), or 0 for n = -127
  float pow2;
  std::memcpy(&pow2, &pow_bits, sizeof pow2);
  return p * pow2;
}

inline vf exp_clamped(vf z) {
  z = select(z > splat(88.0f), splat(88.0f), z);
  z = select(z < splat(-88.0f), splat(-88.0f), z);
  const vf k = z * kLog2e + kShifter;
  const vf n = k - kShifter;
  const vf r = (z - n * kLn2Hi) - n * kLn2Lo;
  vf p = splat(kP0);
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r * r + r + 1.0f;
  return p * (vf)(((vu)k + 127u) << 23);
}

inline float silu(float v) { return v / (1.0f + exp_clamped(-v)); }
#ifdef GN_RECIPROCAL
// The vector division's throughput bounds the output pass; the target's reciprocal estimate (GN_RECIPROCAL, 12 or
// 14 bits) and one Newton step give 1/d to about 1 ulp (0 for d past 2^126, where v/d is below 1e-37 anyway).
inline vf silu(vf v) {
  const vf d = 1.0f + exp_clamped(-v);
  vf r = GN_RECIPROCAL(d);
  r = r * (2.0f - d * r);
  return v * r;
}
#else
inline vf silu(vf v) { return v / (1.0f + exp_clamped(-v)); }
#endif

// ------------------------------------------------------------------------------------------------ NCHW
template <typename T>
void block_stats(const void* xv, int64_t n, double* mean, float* m2) {
  const T* x = static_cast<const T*>(xv);
  const int64_t full = n / kLanes * kLanes;
  vf s = {};
  for (int64_t i = 0; i < full; i += kLanes) s += loadv(x + i);
  float sum = 0.0f;
  for (int64_t i = full; i < n; ++i) sum += load(x, i);
  sum += hsum(s);
  const float m = sum / static_cast<float>(n);
  // Second pass over the (cached) block: deviations from m; their sum corrects both the mean and M2.
  vf d = {}, q = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    const vf v = loadv(x + i) - m;
    d += v;
    q += v * v;
  }
  float dsum = 0.0f, qsum = 0.0f;
  for (int64_t i = full; i < n; ++i) {
    const float v = load(x, i) - m;
    dsum += v;
    qsum += v * v;
  }
  dsum += hsum(d);
  qsum += hsum(q);
  const float corr = dsum / static_cast<float>(n);
  *mean = static_cast<double>(m) + static_cast<double>(corr);  // in fp64: m + corr rounded to fp32 would lose
  const float r = qsum - dsum * corr;                           // |mean| * 2^-24, all of it when |mean| >> std
  *m2 = r > 0.0f ? r : 0.0f;
}

template <typename T>
void row_apply(const void* xv, void* yv, int64_t n, float hi, float a, float shift, bool act) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t full = n / kLanes * kLanes;
  if (act) {
    for (int64_t i = 0; i < full; i += kLanes) storev(y + i, silu((loadv(x + i) - hi) * a + shift));
    for (int64_t i = full; i < n; ++i) store(y, i, silu((load(x, i) - hi) * a + shift));
  } else {
    for (int64_t i = 0; i < full; i += kLanes) storev(y + i, (loadv(x + i) - hi) * a + shift);
    for (int64_t i = full; i < n; ++i) store(y, i, (load(x, i) - hi) * a + shift);
  }
}

// ------------------------------------------------------------------------------------------------ channels last
// Channel chunks outer, pixels inner: each chunk's accumulators stay in registers while the loop walks the block's
// pixels (C elements apart; the block is cache-resident), so an element costs one load and its arithmetic.
constexpr int kChunk = 4;  // vectors of channels per chunk

template <typename T, int V>
void pixel_stats_chunk(const T* x, int64_t P, int64_t C, int64_t c0, double* mean, float* m2) {
  vf s[V] = {};
  for (int64_t p = 0; p < P; ++p) {
    const T* row = x + p * C + c0;
    for (int v = 0; v < V; ++v) s[v] += loadv(row + v * kLanes);
  }
  const float inv = 1.0f / static_cast<float>(P);
  vf m[V], d[V] = {}, q[V] = {};
  for (int v = 0; v < V; ++v) m[v] = s[v] * inv;  // the first-pass means
  for (int64_t p = 0; p < P; ++p) {
    const T* row = x + p * C + c0;
    for (int v = 0; v < V; ++v) {
      const vf e = loadv(row + v * kLanes) - m[v];
      d[v] += e;
      q[v] += e * e;
    }
  }
  for (int v = 0; v < V; ++v) {
    for (int l = 0; l < kLanes; ++l) {  // the deviations' sum corrects the mean (kept in fp64) and M2
      const float corr = d[v][l] * inv;
      mean[c0 + v * kLanes + l] = static_cast<double>(m[v][l]) + static_cast<double>(corr);
      const float r = q[v][l] - d[v][l] * corr;
      m2[c0 + v * kLanes + l] = r > 0.0f ? r : 0.0f;
    }
  }
}

template <typename T>
void pixel_stats(const void* xv, int64_t P, int64_t C, double* mean, float* m2) {
  const T* x = static_cast<const T*>(xv);
  int64_t c0 = 0;
  for (; c0 + kChunk * kLanes <= C; c0 += kChunk * kLanes) pixel_stats_chunk<T, kChunk>(x, P, C, c0, mean, m2);
  for (; c0 + kLanes <= C; c0 += kLanes) pixel_stats_chunk<T, 1>(x, P, C, c0, mean, m2);
  const float inv = 1.0f / static_cast<float>(P);
  for (; c0 < C; ++c0) {  // channels past the last full vector: the same two passes, one channel at a time
    float s = 0.0f;
    for (int64_t p = 0; p < P; ++p) s += load(x, p * C + c0);
    const float m = s * inv;
    float d = 0.0f, q = 0.0f;
    for (int64_t p = 0; p < P; ++p) {
      const float e = load(x, p * C + c0) - m;
      d += e;
      q += e * e;
    }
    const float corr = d * inv;
    mean[c0] = static_cast<double>(m) + static_cast<double>(corr);
    const float r = q - d * corr;
    m2[c0] = r > 0.0f ? r : 0.0f;
  }
}

template <typename T, int V>
void pixel_apply_chunk(const T* x, T* y, int64_t P, int64_t C, int64_t c0, const float* hi, const float* a,
                       const float* shift, bool act) {
  vf h[V], sc[V], sh[V];
  for (int v = 0; v < V; ++v) {
    h[v] = loadv(hi + c0 + v * kLanes);
    sc[v] = loadv(a + c0 + v * kLanes);
    sh[v] = loadv(shift + c0 + v * kLanes);
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t off = p * C + c0;
    for (int v = 0; v < V; ++v) {
      const vf t = (loadv(x + off + v * kLanes) - h[v]) * sc[v] + sh[v];
      storev(y + off + v * kLanes, act ? silu(t) : t);
    }
  }
}

template <typename T>
void pixel_apply(const void* xv, void* yv, int64_t P, int64_t C, const float* hi, const float* a, const float* shift,
                 bool act) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  int64_t c0 = 0;
  for (; c0 + kChunk * kLanes <= C; c0 += kChunk * kLanes) {
    pixel_apply_chunk<T, kChunk>(x, y, P, C, c0, hi, a, shift, act);
  }
  for (; c0 + kLanes <= C; c0 += kLanes) pixel_apply_chunk<T, 1>(x, y, P, C, c0, hi, a, shift, act);
  for (; c0 < C; ++c0) {
    for (int64_t p = 0; p < P; ++p) {
      const float t = (load(x, p * C + c0) - hi[c0]) * a[c0] + shift[c0];
      store(y, p * C + c0, act ? silu(t) : t);
    }
  }
}

const Kernels& GN_KERNELS_NAME() {
  static const Kernels table = {
      {&block_stats<float>, &block_stats<uint16_t>, &block_stats<c10::Half>},
      {&row_apply<float>, &row_apply<uint16_t>, &row_apply<c10::Half>},
      {&pixel_stats<float>, &pixel_stats<uint16_t>, &pixel_stats<c10::Half>},
      {&pixel_apply<float>, &pixel_apply<uint16_t>, &pixel_apply<c10::Half>},
  };
  return table;
}
