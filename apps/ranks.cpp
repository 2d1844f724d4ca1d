#include "ranks.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef DSA_HAVE_MPI
#include <mpi.h>
#endif

#include "dsa/error.hpp"

namespace dsa::app {

namespace {

Ranks world;
bool started = false;
bool ready = false;  // past ranks_ready: a failure now aborts the job

// The processes a launcher started, from what it puts in each one's environment (Open MPI's
// mpirun, PMI's srun and mpiexec), or 1. Not Slurm's SLURM_NTASKS: a batch script's every
// command has it, launched or not.
int launched_processes() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
    if (const char* value = std::getenv(name)) return std::max(1, std::atoi(value));
  }
  return 1;
}

#ifdef DSA_HAVE_MPI
// The exit codes of the ranks that failed before the shared work, the largest.
int agree(int code) {
  int worst = code;
  MPI_Allreduce(&code, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
#endif

}  // namespace

const Ranks& start_ranks(int* argc, char*** argv) {
  if (started) return world;
  started = true;
  const int processes = launched_processes();
#ifdef DSA_HAVE_MPI
  if (processes > 1 || std::getenv("PMIX_RANK")) {  // PMIx launchers say only the rank
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world.size);
    MPI_Comm host;  // the ranks that share this host's memory, and so its GPUs
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world.rank, MPI_INFO_NULL, &host);
    MPI_Comm_rank(host, &world.local_rank);
    MPI_Comm_free(&host);
  }
#else
  (void)argc;
  (void)argv;
  if (processes > 1) {
    bad_usage(
        "{} processes were started, but this build has no MPI (configure with Open MPI's "
        "libopenmpi-dev installed): each would do the whole job",
        processes);
  }
#endif
  return world;
}

const Ranks& ranks() {
  return world;
}

int ranks_ready() {
  ready = true;
#ifdef DSA_HAVE_MPI
  if (world.size > 1) return agree(0);
#endif
  return 0;
}

std::vector<std::vector<std::byte>> gather_bytes(const std::vector<std::byte>& mine) {
  std::vector<std::vector<std::byte>> out;
  if (world.size == 1) {
    out.push_back(mine);
    return out;
  }
#ifdef DSA_HAVE_MPI
  // Sizes first (int64: a share's results can pass 2 GiB), then each rank's bytes in pieces
  // that MPI's int counts can say.
  long long size = static_cast<long long>(mine.size());
  std::vector<long long> sizes(static_cast<std::size_t>(world.size));
  MPI_Gather(&size, 1, MPI_LONG_LONG, sizes.data(), 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  constexpr long long kPiece = 1 << 30;
  if (world.rank == 0) {
    out.resize(static_cast<std::size_t>(world.size));
    out[0] = mine;
    for (int r = 1; r < world.size; ++r) {
      out[r].resize(static_cast<std::size_t>(sizes[r]));
      for (long long at = 0; at < sizes[r]; at += kPiece) {
        const int n = static_cast<int>(std::min(kPiece, sizes[r] - at));
        MPI_Recv(out[r].data() + at, n, MPI_BYTE, r, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      }
    }
  } else {
    for (long long at = 0; at < size; at += kPiece) {
      const int n = static_cast<int>(std::min(kPiece, size - at));
      MPI_Send(mine.data() + at, n, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
    }
  }
#endif
  return out;
}

int fail_rank(const std::string& tool, const std::string& message, int code) {
  const bool own =
      world.size == 1 || world.rank == 0 || code == static_cast<int>(ExitCode::runtime);
  if (own) {
    if (world.size > 1) {
      std::fprintf(stderr, "%s: error (rank %d of %d): %s\n", tool.c_str(), world.rank, world.size,
                   message.c_str());
    } else {
      std::fprintf(stderr, "%s: error: %s\n", tool.c_str(), message.c_str());
    }
  }
#ifdef DSA_HAVE_MPI
  if (world.size > 1) {
    std::fflush(stderr);
    if (ready) MPI_Abort(MPI_COMM_WORLD, code);
    const int worst = agree(code);
    MPI_Finalize();
    return worst;
  }
#endif
  finish_ranks();
  return code;
}

void finish_ranks() {
#ifdef DSA_HAVE_MPI
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Finalize();
#endif
}

}  // namespace dsa::app
