// The Winograd 3x3 convolution transforms, written once and compiled once per instruction set: each
// csrc/cpu/winograd_*.cpp file switches the target (#pragma GCC target) and includes this file inside its own
// namespace (as group_norm_silu_loops.h). The loops run along the channels (channels-last data), VEC_LANES floats at
// a time, in fp32 whatever the element type. Include only from those files.
//
// Winograd F(m x m, 3 x 3) with tiles of A = m + 2 pixels (A = 4: m = 2; A = 6: m = 4), points 0, +-1, +-2, inf:
//   V = B^T d B (input tile d, A x A),  M = V (.) U over channels (the GEMMs, done by the driver),  Y = A^T M A.
// The matrices (rows):
//   F(2,3)  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]            A^T = [1 1 1 0; 0 1 -1 -1]
//   F(4,3)  B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//           A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
// (G, for the weights, is applied once per weight in Python: fastdiff.ops.winograd_weight.)
//
// Expects: <cstdint>, <cstring>, <c10/util/Half.h> included, WG_KERNELS_NAME the name of the table's getter and
// WG_LANES the vector width in floats.

#define VEC_LANES WG_LANES
#include "vector_io.h"
#undef VEC_LANES

// n <= kLanes elements: a whole vector, or the first n lanes (the rest zero).
template <typename T>
inline vf load_n(const T* p, int64_t n) {
  if (n == kLanes) return loadv(p);
  vf v = splat(0.0f);
  for (int64_t l = 0; l < n; ++l) v[l] = load(p, l);
  return v;
}
template <typename T>
inline void store_n(T* p, vf v, int64_t n) {
  if (n == kLanes) {
    storev(p, v);
    return;
  }
  for (int64_t l = 0; l < n; ++l) store(p, l, v[l]);
}

// ------------------------------------------------------------------------------------------------ 1-D transforms
// r = B^T d along one axis: d[i * s], r[i * s] for i < A.
inline void input_1d(const vf* d, vf* r, int s, std::integral_constant<int, 4>) {
  r[0] = d[0] - d[2 * s];
  r[s] = d[s] + d[2 * s];
  r[2 * s] = d[2 * s] - d[s];
  r[3 * s] = d[s] - d[3 * s];
}
inline void input_1d(const vf* d, vf* r, int s, std::integral_constant<int, 6>) {
  const vf d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
  const vf four = splat(4.0f), five = splat(5.0f), two = splat(2.0f);
  r[0] = four * d0 - five * d2 + d4;
  r[s] = d3 + d4 - four * (d1 + d2);
  r[2 * s] = four * (d1 - d2) + d4 - d3;
  r[3 * s] = two * (d3 - d1) + d4 - d2;
  r[4 * s] = two * (d1 - d3) + d4 - d2;
  r[5 * s] = four * d1 - five * d3 + d5;
}
// o = A^T mm along one axis: mm[j * s] for j < A, o[i * t] for i < A - 2.
inline void output_1d(const vf* mm, int s, vf* o, int t, std::integral_constant<int, 4>) {
  o[0] = mm[0] + mm[s] + mm[2 * s];
  o[t] = mm[s] - mm[2 * s] - mm[3 * s];
}
inline void output_1d(const vf* mm, int s, vf* o, int t, std::integral_constant<int, 6>) {
  const vf m1 = mm[s], m2 = mm[2 * s], m3 = mm[3 * s], m4 = mm[4 * s];
  const vf p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
  o[0] = mm[0] + p12 + p34;
  o[t] = d12 + splat(2.0f) * d34;
  o[2 * t] = p12 + splat(4.0f) * p34;
  o[3 * t] = d12 + splat(8.0f) * d34 + mm[5 * s];
}

// ------------------------------------------------------------------------------------------------ tiles
// Tile g of the batch (g = (n * th + ty) * tw + tx) covers output rows ty*m .. ty*m + m - 1 (columns alike) and reads
// input rows ty*m - 1 .. ty*m + m (zero outside the image: padding 1).

// V[(i * A + j) * Tb + s][c] = (B^T d B)[i][j] for the tiles g0 + s, s < count, c < C; rows of ldv >= C elements,
// columns C .. ldv - 1 and slots count .. Tb - 1 zero. x: (N, H, W, C) contiguous.
template <typename T, int A>
void input_tiles(const void* x_, void* v_, int64_t H, int64_t W, int64_t C, int64_t ldv, int64_t th, int64_t tw,
                 int64_t g0, int64_t count, int64_t Tb) {
  constexpr int m = A - 2;
  const T* x = static_cast<const T*>(x_);
  T* v = static_cast<T*>(v_);
  const int64_t P = th * tw;
  for (int64_t s = 0; s < Tb; ++s) {
    if (s >= count) {
      for (int ij = 0; ij < A * A; ++ij) std::memset(v + (ij * Tb + s) * ldv, 0, sizeof(T) * ldv);
      continue;
    }
    const int64_t g = g0 + s, n = g / P, y0 = (g % P) / tw * m - 1, x0 = (g % P) % tw * m - 1;
    const T* rows[A][A];
    for (int i = 0; i < A; ++i) {
      for (int j = 0; j < A; ++j) {
        const int64_t y = y0 + i, xx = x0 + j;
        rows[i][j] = (y >= 0 && y < H && xx >= 0 && xx < W) ? x + ((n * H + y) * W + xx) * C : nullptr;
      }
    }
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t nl = std::min<int64_t>(kLanes, C - c);
      vf d[A * A], t[A * A], r[A * A];
      for (int ij = 0; ij < A * A; ++ij) {
        const T* p = rows[ij / A][ij % A];
        d[ij] = p ? load_n(p + c, nl) : splat(0.0f);
      }
      for (int j = 0; j < A; ++j) input_1d(d + j, t + j, A, std::integral_constant<int, A>{});   // columns
      for (int i = 0; i < A; ++i) input_1d(t + i * A, r + i * A, 1, std::integral_constant<int, A>{});  // rows
      for (int ij = 0; ij < A * A; ++ij) store_n(v + (ij * Tb + s) * ldv + c, r[ij], nl);
    }
    if (ldv > C) {
      for (int ij = 0; ij < A * A; ++ij) std::memset(v + (ij * Tb + s) * ldv + C, 0, sizeof(T) * (ldv - C));
    }
  }
}

// y[n, ty*m + a, tx*m + b, k] = (A^T M A)[a][b] + bias[k] for the tiles g0 + s, s < count, inside the image.
// M: (A*A, Tb, ldm >= K); y: (N, H, W, K) contiguous; bias: K floats or null.
template <typename T, int A>
void output_tiles(const void* mm_, void* y_, const float* bias, int64_t H, int64_t W, int64_t K, int64_t ldm,
                  int64_t th, int64_t tw, int64_t g0, int64_t count, int64_t Tb) {
  constexpr int m = A - 2;
  const T* mm = static_cast<const T*>(mm_);
  T* y = static_cast<T*>(y_);
  const int64_t P = th * tw;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t g = g0 + s, n = g / P, y0 = (g % P) / tw * m, x0 = (g % P) % tw * m;
    const int rows = static_cast<int>(std::min<int64_t>(m, H - y0)), cols = static_cast<int>(std::min<int64_t>(m, W - x0));
    for (int64_t k = 0; k < K; k += kLanes) {
      const int64_t nl = std::min<int64_t>(kLanes, K - k);
      vf d[A * A], t[m * A], o[m * m];
      for (int ij = 0; ij < A * A; ++ij) d[ij] = load_n(mm + (ij * Tb + s) * ldm + k, nl);
      for (int j = 0; j < A; ++j) output_1d(d + j, A, t + j, A, std::integral_constant<int, A>{});  // columns
      for (int a = 0; a < m; ++a) output_1d(t + a * A, 1, o + a * m, 1, std::integral_constant<int, A>{});  // rows
      const vf b = bias ? load_n(bias + k, nl) : splat(0.0f);
      for (int a = 0; a < rows; ++a) {
        for (int bb = 0; bb < cols; ++bb) store_n(y + ((n * H + y0 + a) * W + x0 + bb) * K + k, o[a * m + bb] + b, nl);
      }
    }
  }
}

inline const wg_cpu::Kernels& WG_KERNELS_NAME() {
  static const wg_cpu::Kernels table = {
      {{&input_tiles<float, 4>, &input_tiles<float, 6>}, {&input_tiles<uint16_t, 4>, &input_tiles<uint16_t, 6>}},
      {{&output_tiles<float, 4>, &output_tiles<float, 6>}, {&output_tiles<uint16_t, 4>, &output_tiles<uint16_t, 6>}},
  };
  return table;
}
