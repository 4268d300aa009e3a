// The GroupNorm + SiLU loops (group_norm_silu_loops.h) compiled for portable code (any CPU). See csrc/group_norm_silu.h.
#include "group_norm_silu_kernels.h"


#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastdiff {
namespace gn_cpu {
namespace generic {
#define GN_KERNELS_NAME table
#define GN_LANES 4
#include "group_norm_silu_loops.h"
#undef GN_LANES
#undef GN_KERNELS_NAME
}  // namespace generic

const Kernels& kernels_generic() { return generic::table(); }

}  // namespace gn_cpu
}  // namespace fastdiff
