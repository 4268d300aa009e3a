// CPU implementation of fastdiff::group_norm_silu_native (see group_norm_silu.h for the contract).
//
// Two parallel passes over x, both split into work items that depend only on the sample's shape:
// 1. statistics: NCHW: each group's C/G * S elements are contiguous, cut into blocks of gn_cpu::kBlock; channels
//    last: each sample's S pixels are cut into blocks of P pixels, and each block gives per-channel moments (the
//    vector loops run along C). A block's mean and M2 come from two fp32 passes over the cached block (the second
//    corrects the first), and the blocks of a group are merged in fp64 with Chan's formula, in a fixed order;
// 2. output: y = act((x - hi) * a + shift) with hi the group mean rounded to fp32, a = w rstd and
//    shift = b - (mean - hi) a: x - hi is exact near the mean, so no digit is lost when |mean| >> std.
// So x is read twice from memory (once per pass) and y written once; nothing else is materialised but the
// per-block moments. Loops: csrc/cpu/group_norm_silu_loops.h, compiled per instruction set.
#include "group_norm_silu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/group_norm_silu_kernels.h"
#include "cpu_isa.h"

namespace fastdiff {
namespace {

using gn_cpu::Kernels;

const Kernels& active_kernels() {
  switch (active_cpu_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case CpuIsa::kAmx:
    case CpuIsa::kAvx512:
      return gn_cpu::kernels_avx512();
    case CpuIsa::kAvx2:
      return gn_cpu::kernels_avx2();
#endif
    default:
      return gn_cpu::kernels_generic();
  }
}

// Count, mean and M2 of a set, merged with another set's (Chan et al.): exact in exact arithmetic, fp64 here.
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double n, double m, double q) {
    if (n == 0.0) return;
    const double total = count + n;
    const double delta = m - mean;
    mean += delta * (n / total);
    m2 += q + delta * delta * (count * n / total);
    count = total;
  }
};

void check_param(const char* name, const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t channels) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == channels, "group_norm_silu: ", name, " must have shape (",
                    channels, ",), got ", p->sizes());
  TORCH_CHECK_TYPE(p->scalar_type() == at::kFloat || p->scalar_type() == x.scalar_type(), "group_norm_silu: ", name,
                   " must be float32 or x's dtype ", x.scalar_type(), ", got ", p->scalar_type());
  TORCH_CHECK_VALUE(p->device().is_cpu(), "group_norm_silu: ", name, " must be on the CPU, got ", p->device());
}

// The (C,) parameter as fp32 values (fill where absent).
std::vector<float> param_values(const std::optional<at::Tensor>& p, int64_t channels, float fill) {
  if (!p.has_value() || !p->defined()) return std::vector<float>(channels, fill);
  const at::Tensor f = p->to(at::kFloat).contiguous();
  const float* data = f.data_ptr<float>();
  return std::vector<float>(data, data + channels);
}

}  // namespace

at::Tensor group_norm_silu_cpu(const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2, "group_norm_silu: x must have shape (N, C, *spatial), got ", x_in.sizes());
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "group_norm_silu: x must be on the CPU, got ", x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "group_norm_silu: x must be float32, bfloat16 or float16, got ", dtype);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, "group_norm_silu: num_groups must be a positive divisor "
                    "of C=", C, ", got ", num_groups);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "group_norm_silu: eps must be a finite number > 0, got ", eps);
  check_param("weight", weight, x_in, C);
  check_param("bias", bias, x_in, C);

  at::Tensor x = x_in;
  bool nhwc = false;
  if (!x.is_contiguous()) {
    const auto format = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    nhwc = (x.dim() == 4 || x.dim() == 5) && x.is_contiguous(format);
    if (!nhwc) x = x.contiguous();
  }
  // x's own strides: a dense layout addressed exactly as the path below reads x (this keeps the strides of a
  // layout that is both, e.g. channels_last with H = W = 1).
  at::Tensor y = at::empty_strided(x.sizes(), x.strides(), x.options());
  if (x.numel() == 0) return y;

  const int64_t G = num_groups, Cg = C / G, S = x.numel() / (N * C);
  const std::vector<float> w = param_values(weight, C, 1.0f), b = param_values(bias, C, 0.0f);
  const int dt = dtype == at::kFloat ? gn_cpu::kF32 : dtype == at::kBFloat16 ? gn_cpu::kBF16 : gn_cpu::kF16;
  const int64_t esz = static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* yp = static_cast<char*>(y.mutable_data_ptr());
  const Kernels& k = active_kernels();
  constexpr int64_t kGrainElems = 16384;  // elements per parallel chunk, at least

  // Group statistics -> per (n, c): hi (the mean rounded to fp32), scale a = w rstd, shift = b - (mean - hi) a.
  std::vector<float> hi(N * C), a(N * C), shift(N * C);
  auto finish_group = [&](int64_t ng, const Moments& m) {
    const double rstd = 1.0 / std::sqrt(m.m2 / m.count + eps);
    const float mean_hi = static_cast<float>(m.mean);
    const double mean_lo = m.mean - mean_hi;
    const int64_t n = ng / G, c0 = (ng % G) * Cg;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const double scale = w[c] * rstd;
      hi[n * C + c] = mean_hi;
      a[n * C + c] = static_cast<float>(scale);
      shift[n * C + c] = static_cast<float>(b[c] - mean_lo * scale);
    }
  };

  if (!nhwc) {
    const int64_t group_elems = Cg * S, nblk = (group_elems + gn_cpu::kBlock - 1) / gn_cpu::kBlock;
    std::vector<double> bmean(N * G * nblk);
    std::vector<float> bm2(N * G * nblk);
    const int64_t block_elems = std::min(gn_cpu::kBlock, group_elems);
    at::parallel_for(0, N * G * nblk, std::max<int64_t>(1, kGrainElems / block_elems), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t start = (t % nblk) * gn_cpu::kBlock;
        const int64_t count = std::min(gn_cpu::kBlock, group_elems - start);
        k.block_stats[dt](xp + ((t / nblk) * group_elems + start) * esz, count, &bmean[t], &bm2[t]);
      }
    });
    at::parallel_for(0, N * G, std::max<int64_t>(1, 256 / nblk), [&](int64_t g0, int64_t g1) {
      for (int64_t ng = g0; ng < g1; ++ng) {
        Moments m;
        for (int64_t j = 0; j < nblk; ++j) {
          const int64_t count = std::min(gn_cpu::kBlock, group_elems - j * gn_cpu::kBlock);
          m.merge(static_cast<double>(count), bmean[ng * nblk + j], bm2[ng * nblk + j]);
        }
        finish_group(ng, m);
      }
    });
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElems / S), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        k.row_apply[dt](xp + r * S * esz, yp + r * S * esz, S, hi[r], a[r], shift[r], silu);
      }
    });
    return y;
  }

  // Channels last: sample n is an (S, C) matrix.
  const int64_t P = std::min(S, std::max<int64_t>(16, gn_cpu::kPixelBlock / C));
  const int64_t nblk = (S + P - 1) / P;
  std::vector<double> bmean(N * nblk * C);
  std::vector<float> bm2(N * nblk * C);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (P * C));
  at::parallel_for(0, N * nblk, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, p0 = (t % nblk) * P;
      k.pixel_stats[dt](xp + (n * S + p0) * C * esz, std::min(P, S - p0), C, &bmean[t * C], &bm2[t * C]);
    }
  });
  // Per channel, the blocks of P pixels have equal counts (all but a shorter last one): their merged mean is the
  // mean of the block means and M2 = sum of M2_b + P * sum of (mean_b - mean)^2, no division per block (a Chan merge
  // per block and channel would cost more than reading the data at large C); then the short block, then the group's
  // channels, all in a fixed order.
  const int64_t full_blocks = S % P == 0 ? nblk : nblk - 1;
  at::parallel_for(0, N * G, std::max<int64_t>(1, 4096 / (Cg * nblk)), [&](int64_t g0, int64_t g1) {
    std::vector<double> mean(Cg), q(Cg);
    for (int64_t ng = g0; ng < g1; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * Cg;
      const double* means = &bmean[n * nblk * C + c0];  // block j, channel c0 + i: means[j * C + i]
      const float* m2s = &bm2[n * nblk * C + c0];
      std::fill(mean.begin(), mean.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t j = 0; j < full_blocks; ++j) {  // blocks outer, channels inner: contiguous reads
        for (int64_t i = 0; i < Cg; ++i) mean[i] += means[j * C + i];
      }
      for (int64_t i = 0; i < Cg; ++i) mean[i] /= static_cast<double>(std::max<int64_t>(full_blocks, 1));
      for (int64_t j = 0; j < full_blocks; ++j) {
        for (int64_t i = 0; i < Cg; ++i) {
          const double dev = means[j * C + i] - mean[i];
          q[i] += static_cast<double>(m2s[j * C + i]) + static_cast<double>(P) * dev * dev;
        }
      }
      Moments m;
      for (int64_t i = 0; i < Cg; ++i) {
        Moments channel;
        if (full_blocks > 0) channel.merge(static_cast<double>(full_blocks * P), mean[i], q[i]);
        if (full_blocks < nblk) {
          channel.merge(static_cast<double>(S - full_blocks * P), means[full_blocks * C + i], m2s[full_blocks * C + i]);
        }
        m.merge(channel.count, channel.mean, channel.m2);
      }
      finish_group(ng, m);
    }
  });
  at::parallel_for(0, N * nblk, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, p0 = (t % nblk) * P;
      const int64_t off = (n * S + p0) * C * esz;
      k.pixel_apply[dt](xp + off, yp + off, std::min(P, S - p0), C, &hi[n * C], &a[n * C], &shift[n * C], silu);
    }
  });
  return y;
}

}  // namespace fastdiff
