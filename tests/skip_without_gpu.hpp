// Internal to the tests: a CUDA test without a usable GPU skips, saying why (CI has none).
#pragma once

#include <gtest/gtest.h>

#include "dsa/device.hpp"

#define SKIP_WITHOUT_GPU()                                                             \
  do {                                                                                 \
    if (!::dsa::cuda_available()) GTEST_SKIP() << "no usable GPU: CUDA tests skipped"; \
  } while (0)
