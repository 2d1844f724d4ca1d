// libFuzzer target: the .jsonl token file reader (fuzz/inputs.hpp).
#include "inputs.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  dsa::fuzz::jsonl(data, size);
  return 0;
}
