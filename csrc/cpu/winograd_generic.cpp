// The Winograd transform loops (winograd_loops.h) compiled for portable code (any CPU). See csrc/conv3x3_winograd.h.
#include "winograd_kernels.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastdiff {
namespace wg_cpu {
namespace generic {
#define WG_KERNELS_NAME table
#define WG_LANES 4
#include "winograd_loops.h"
#undef WG_LANES
#undef WG_KERNELS_NAME
}  // namespace generic

const Kernels& kernels_generic() { return generic::table(); }

}  // namespace wg_cpu
}  // namespace fastdiff
