// The GroupNorm + SiLU loops, written once and compiled once per instruction set: each csrc/cpu/group_norm_silu_*.cpp
// file includes its system headers, switches the target (#pragma GCC target) and includes this file inside its own
// namespace, so every function here exists once per instruction set and nothing here is shared between them.
// The loops use the compilers' generic vectors (GN_LANES floats, the target's register width), bf16 by
// bit shifts, exp by range reduction and a polynomial (no calls). Include only from those files.
//
// Expects: <cstdint>, <cstring>, <c10/util/Half.h> included, GN_KERNELS_NAME the name of the table's getter and
// GN_LANES the vector width in floats.

// GN_LANES floats per vector, the including file's register width: 16 (zmm), 8 (ymm) or 4 (xmm).
constexpr int kLanes = GN_LANES;
typedef float vf __attribute__((vector_size(4 * GN_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * GN_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * GN_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * GN_LANES)));

inline vf splat(float v) { return vf{} + v; }
inline vf select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
inline float hsum(vf v) {  // lanes added in a fixed order
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// ------------------------------------------------------------------------------------------------ element access
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {  // bf16 bits -> fp32, exact
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadv(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline vf loadv(const c10::Half* p) {
  vf v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // fp32 -> bf16, round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i] = v != v ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}
inline void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void storev(uint16_t* p, vf v) {  // the scalar rounding above, lane by lane
  const vu bits = (vu)v;
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vi nan = v != v;
  const vu out = (vu)((nan & 0x7FC0) | (~nan & (vi)rounded));
  const vh h = __builtin_convertvector(out, vh);
  std::memcpy(p, &h, sizeof h);
}
inline void storev(c10::Half* p, vf v) {
  for (int l = 0; l < kLanes; ++l) p[l] = c10::Half(v[l]);
}

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
inline vf silu(vf v) { return v / (1.0f + exp_clamped(-v)); }

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
void row_apply(const void* xv, void* yv, int64_t n, float hi, float lo, float a, float b, bool act) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t full = n / kLanes * kLanes;
  if (act) {
    for (int64_t i = 0; i < full; i += kLanes) storev(y + i, silu(((loadv(x + i) - hi) - lo) * a + b));
    for (int64_t i = full; i < n; ++i) store(y, i, silu(((load(x, i) - hi) - lo) * a + b));
  } else {
    for (int64_t i = 0; i < full; i += kLanes) storev(y + i, ((loadv(x + i) - hi) - lo) * a + b);
    for (int64_t i = full; i < n; ++i) store(y, i, ((load(x, i) - hi) - lo) * a + b);
  }
}

// ------------------------------------------------------------------------------------------------ channels last
template <typename T>
void pixel_stats(const void* xv, int64_t P, int64_t C, double* mean, float* m2, float* scratch) {
  const T* x = static_cast<const T*>(xv);
  const int64_t full = C / kLanes * kLanes;
  float* s = scratch;
  float* d = scratch + C;
  float* q = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) s[c] = d[c] = q[c] = 0.0f;
  for (int64_t p = 0; p < P; ++p) {
    const T* row = x + p * C;
    for (int64_t c = 0; c < full; c += kLanes) storev(s + c, loadv(s + c) + loadv(row + c));
    for (int64_t c = full; c < C; ++c) s[c] += load(row, c);
  }
  const float inv = 1.0f / static_cast<float>(P);
  for (int64_t c = 0; c < C; ++c) s[c] *= inv;  // the first-pass means
  for (int64_t p = 0; p < P; ++p) {
    const T* row = x + p * C;
    for (int64_t c = 0; c < full; c += kLanes) {
      const vf v = loadv(row + c) - loadv(s + c);
      storev(d + c, loadv(d + c) + v);
      storev(q + c, loadv(q + c) + v * v);
    }
    for (int64_t c = full; c < C; ++c) {
      const float v = load(row, c) - s[c];
      d[c] += v;
      q[c] += v * v;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const float corr = d[c] * inv;
    mean[c] = static_cast<double>(s[c]) + static_cast<double>(corr);
    const float r = q[c] - d[c] * corr;
    m2[c] = r > 0.0f ? r : 0.0f;
  }
}

template <typename T>
void pixel_apply(const void* xv, void* yv, int64_t P, int64_t C, const float* hi, const float* lo, const float* a,
                 const float* b, bool act) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t full = C / kLanes * kLanes;
  for (int64_t p = 0; p < P; ++p) {
    const T* xr = x + p * C;
    T* yr = y + p * C;
    for (int64_t c = 0; c < full; c += kLanes) {
      const vf v = ((loadv(xr + c) - loadv(hi + c)) - loadv(lo + c)) * loadv(a + c) + loadv(b + c);
      storev(yr + c, act ? silu(v) : v);
    }
    for (int64_t c = full; c < C; ++c) {
      const float v = ((load(xr, c) - hi[c]) - lo[c]) * a[c] + b[c];
      store(yr, c, act ? silu(v) : v);
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
