// The CPU kernels for any CPU: the compiler's baseline instruction set (SSE2 on x86-64); register
// tiles sized for its vector registers.
#define DSA_KERNELS generic
#define DSA_KERNELS_NAME "generic"
#define DSA_INDEX_HEADS 2
#define DSA_INDEX_PANELS 1
#define DSA_QK_KEYS 2
#define DSA_QK_SPLIT 1
#define DSA_PV_HEADS 2
#define DSA_PV_VECTORS 1
#include "cpu_kernels.inc"
