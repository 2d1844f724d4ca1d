// The ranks of an MPI job (docs/DESIGN.md section 8). A tool that mpirun or srun started is one
// rank of N; otherwise it is the one rank of one, with or without MPI in the build. Only the
// communication lives here: what the ranks compute is the library's (metrics.hpp's shares).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dsa/rows.hpp"

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
// The report's `ranks` on rank 0: every rank's rank, device, rows [begin, end) of the B x Lq
// and timings, in rank order; null on the other ranks.
nlohmann::json gather_rank_entries(const nlohmann::json& device, RowRange rows,
                                   const nlohmann::json& timings_ms);

// One output of a tool whose ranks share the rows: rank 0 writes its own rows (the first share)
// as they are computed, the other ranks keep theirs, and gather() has rank 0 receive and write
// them in rank order, a piece of at most 64 MiB at a time, so the output is one process's to the
// byte. One rank alone writes everything at once and gather() does nothing. A rank keeps at most
// kInMemory bytes of its share in memory (DSA_RANK_MEMORY=BYTES sets another limit, for tests);
// a larger share waits in an unlinked temporary file in $TMPDIR (default /tmp), so long
// contexts stay in bounded memory (an attention output at L = 131072 is 34 GB).
class SharedOutput {
 public:
  static constexpr std::size_t kInMemory = 64 << 20;
  using Write = std::function<void(const void* data, std::size_t size)>;
  explicit SharedOutput(Write write) : write_(std::move(write)) {}
  ~SharedOutput();
  SharedOutput(const SharedOutput&) = delete;
  SharedOutput& operator=(const SharedOutput&) = delete;
  // Room for this rank's share where its size is known up front (held once, not grown into);
  // a share above kInMemory goes to the temporary file from the start.
  void reserve(std::size_t bytes);
  void add(const void* data, std::size_t size);
  // Every rank calls it, for its outputs in one order (it sends or receives).
  void gather();

 private:
  void spill();  // from now on the share goes to the temporary file, what was kept first
  void add_to_file(const void* data, std::size_t size);
  Write write_;
  std::vector<std::byte> kept_;   // a rank but the first: its rows, until gather()
  std::FILE* spilled_ = nullptr;  // or all of them here, once they pass kInMemory
  std::size_t spilled_bytes_ = 0;
};

// A rank's error: printed (by rank 0, and by any rank for a runtime error: what only one rank
// saw), then, before ranks_ready, given to the others through it; after, the job is aborted with
// `code` (MPI_Abort), since the others may wait on this rank. Returns the exit code.
int fail_rank(const std::string& tool, const std::string& message, int code);
// MPI_Finalize at the end of a successful run.
void finish_ranks();

}  // namespace dsa::app
