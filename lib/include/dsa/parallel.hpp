// Thread count of the CPU backend (OpenMP).
#pragma once

namespace dsa {

// n <= 0 keeps the default (OMP_NUM_THREADS or every core).
void set_threads(int n);
int max_threads();

}  // namespace dsa
