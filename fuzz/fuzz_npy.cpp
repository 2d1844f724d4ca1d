// libFuzzer target: the .npy reader (fuzz/inputs.hpp).
#include "inputs.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  dsa::fuzz::npy(data, size);
  return 0;
}
