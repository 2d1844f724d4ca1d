// The ranks of an MPI job (docs/DESIGN.md section 8). A tool that mpirun or srun started is one
// rank of N; otherwise it is the one rank of one, with or without MPI in the build. Only the
// communication lives here: what the ranks compute is the library's (metrics.hpp's shares).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace dsa::app {

struct Ranks {
  int rank = 0, size = 1;
  int local_rank = 0;  // among the ranks on this host: which of its GPUs is this rank's
};

// Starts MPI once when a launcher started this process and the build has MPI; Error(usage) when
// a launcher started several processes of a build without MPI (each would do the whole job).
const Ranks& start_ranks(int* argc, char*** argv);
const Ranks& ranks();

// Every rank calls it before the work that ranks share: 0 when every rank got there, else the
// exit code of a rank that failed before (fail_rank), which this rank then exits with silently
// (throw PeerFailed: run() returns its code without a message).
int ranks_ready();
struct PeerFailed {
  int code;
};
// Rank 0 gets every rank's bytes in rank order, its own first; the other ranks get nothing.
std::vector<std::vector<std::byte>> gather_bytes(const std::vector<std::byte>& mine);

// A rank's error: printed (by rank 0, and by any rank for a runtime error: what only one rank
// saw), then, before ranks_ready, given to the others through it; after, the job is aborted with
// `code` (MPI_Abort), since the others may wait on this rank. Returns the exit code.
int fail_rank(const std::string& tool, const std::string& message, int code);
// MPI_Finalize at the end of a successful run.
void finish_ranks();

}  // namespace dsa::app
