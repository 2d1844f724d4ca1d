// Does compute-sanitizer racecheck take bar.arrive as ordering the arriving threads' writes?
// Two groups of 128 threads hand a shared array to each other through named barriers, the
// writer arriving and the reader syncing (mode 0, the pair attention kernel's hand-offs), or
// both syncing (mode 1). Both are correct by the PTX barrier semantics; racecheck reports
// hazards on mode 0 only (bench/NOTES.md, "racecheck's arrive"). Standalone, not built by CMake:
//   nvcc -O2 -arch=sm_90a -lineinfo -o racecheck_arrive bench/racecheck_arrive.cu
//   compute-sanitizer --tool racecheck --racecheck-report hazard ./racecheck_arrive 0
#include <cstdio>
#include <cstring>

namespace {

__device__ __forceinline__ void arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Group 0 writes hand[0] and signals barrier 1, group 1 reads it after barrier 1, writes
// hand[1] and signals barrier 2, group 0 reads that after barrier 2; `rounds` times. A group
// writes its array again only after the other's signal that follows the other's read.
template <bool kArrive>
__global__ void hand_off(float* out, int rounds) {
  __shared__ float hand[2][128];
  const int group = threadIdx.x / 128, lane = threadIdx.x % 128;
  float sum = 0.0f;
  for (int i = 0; i < rounds; ++i) {
    if (group == 0) {
      hand[0][lane] = static_cast<float>(i + lane);
      kArrive ? arrive(1, 256) : sync(1, 256);
    } else {
      sync(1, 256);
      sum += hand[0][lane];
    }
    if (group == 1) {
      hand[1][lane] = sum;
      kArrive ? arrive(2, 256) : sync(2, 256);
    } else {
      sync(2, 256);
      sum += hand[1][lane];
    }
  }
  out[threadIdx.x] = sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || (std::strcmp(argv[1], "0") != 0 && std::strcmp(argv[1], "1") != 0)) {
    std::fprintf(stderr, "usage: racecheck_arrive 0|1 (0: arrive then sync, 1: sync on both)\n");
    return 2;
  }
  float* out = nullptr;
  if (cudaMalloc(&out, 256 * sizeof(float)) != cudaSuccess) return 1;
  if (argv[1][0] == '0') {
    hand_off<true><<<1, 256>>>(out, 8);
  } else {
    hand_off<false><<<1, 256>>>(out, 8);
  }
  const cudaError_t status = cudaDeviceSynchronize();
  std::printf("mode %s: %s\n", argv[1], cudaGetErrorString(status));
  cudaFree(out);
  return status == cudaSuccess ? 0 : 1;
}
