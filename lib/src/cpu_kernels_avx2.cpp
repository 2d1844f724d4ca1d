// The CPU kernels for AVX2 + FMA; register tiles sized for its vector registers.
#define DSA_KERNELS avx2
#define DSA_KERNELS_NAME "avx2"
#define DSA_INDEX_HEADS 4
#define DSA_INDEX_PANELS 1
#define DSA_QK_KEYS 3
#define DSA_QK_SPLIT 2
#define DSA_PV_HEADS 2
#define DSA_PV_VECTORS 2
#include "cpu_kernels.inc"
