// Vector types and element access for the CPU loop headers (group_norm_silu_loops.h, winograd_loops.h):
// the compilers' generic vectors of VEC_LANES floats (the including target's register width: 16, 8 or 4), fp32,
// bf16 (bit shifts, round to nearest even) and fp16 elements. Included inside each instruction-set file's own
// namespace, so it has no include guard; include only from a loops header.
//
// Expects: <cstdint>, <cstring>, <c10/util/Half.h> included and VEC_LANES defined.

constexpr int kLanes = VEC_LANES;
typedef float vf __attribute__((vector_size(4 * VEC_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * VEC_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * VEC_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * VEC_LANES)));

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

