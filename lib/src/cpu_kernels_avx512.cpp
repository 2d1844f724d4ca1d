// The CPU kernels for AVX-512 (F, VL, BW, DQ) + FMA; register tiles sized for its vector registers.
#define DSA_KERNELS avx512
#define DSA_KERNELS_NAME "avx512"
#define DSA_INDEX_HEADS 8
#define DSA_INDEX_PANELS 3
#define DSA_QK_KEYS 8
#define DSA_QK_SPLIT 2
#define DSA_PV_HEADS 4
#define DSA_PV_VECTORS 4
#include "cpu_kernels.inc"
