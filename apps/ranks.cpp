#include "ranks.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef DSA_HAVE_MPI
#include <mpi.h>
#endif

#include <fmt/format.h>

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

nlohmann::json gather_rank_entries(const nlohmann::json& device, RowRange rows,
                                   const nlohmann::json& timings_ms) {
  const nlohmann::json entry = {{"rank", world.rank},
                                {"device", device},
                                {"rows", {rows.begin, rows.end}},
                                {"timings_ms", timings_ms}};
  const std::string text = entry.dump();
  const auto* chars = reinterpret_cast<const std::byte*>(text.data());
  const auto texts = gather_bytes(std::vector<std::byte>(chars, chars + text.size()));
  if (world.rank != 0) return nullptr;
  nlohmann::json entries = nlohmann::json::array();
  for (const auto& bytes : texts) {
    const auto* begin = reinterpret_cast<const char*>(bytes.data());
    entries.push_back(nlohmann::json::parse(begin, begin + bytes.size()));
  }
  return entries;
}

namespace {

std::size_t in_memory_limit() {
  const char* text = std::getenv("DSA_RANK_MEMORY");
  return text && *text ? static_cast<std::size_t>(std::strtoull(text, nullptr, 10))
                       : SharedOutput::kInMemory;
}

}  // namespace

SharedOutput::~SharedOutput() {
  if (spilled_) std::fclose(spilled_);
}

void SharedOutput::reserve(std::size_t bytes) {
  if (world.rank == 0) return;
  if (bytes > in_memory_limit()) {
    spill();
  } else {
    kept_.reserve(bytes);
  }
}

void SharedOutput::spill() {
  if (spilled_) return;
  const char* dir = std::getenv("TMPDIR");
  std::string path = std::string(dir && *dir ? dir : "/tmp") + "/dsa-rank-share.XXXXXX";
  const int fd = mkstemp(path.data());
  if (fd < 0 || unlink(path.c_str()) != 0 || !(spilled_ = fdopen(fd, "w+b"))) {
    const std::string why = std::strerror(errno);
    if (fd >= 0 && !spilled_) close(fd);
    throw Error(ExitCode::runtime,
                fmt::format("cannot keep this rank's share of the output in {}: {} (set TMPDIR)",
                            path, why));
  }
  add_to_file(kept_.data(), kept_.size());
  std::vector<std::byte>().swap(kept_);
}

void SharedOutput::add_to_file(const void* data, std::size_t size) {
  if (size > 0 && std::fwrite(data, 1, size, spilled_) != size) {
    throw Error(ExitCode::runtime,
                fmt::format("cannot keep this rank's share of the output in $TMPDIR: {}",
                            std::strerror(errno)));
  }
  spilled_bytes_ += size;
}

void SharedOutput::add(const void* data, std::size_t size) {
  if (world.rank == 0) {
    write_(data, size);
    return;
  }
  if (!spilled_ && kept_.size() + size > in_memory_limit()) spill();
  if (spilled_) {
    add_to_file(data, size);
    return;
  }
  const auto* bytes = static_cast<const std::byte*>(data);
  kept_.insert(kept_.end(), bytes, bytes + size);
}

void SharedOutput::gather() {
  if (world.size == 1) return;
#ifdef DSA_HAVE_MPI
  // Each rank's size (int64), then its bytes in pieces that MPI's int counts can say and that
  // rank 0 writes before it receives the next.
  constexpr long long kPiece = 64 << 20;
  if (world.rank == 0) {
    std::vector<std::byte> piece;
    for (int r = 1; r < world.size; ++r) {
      long long size = 0;
      MPI_Recv(&size, 1, MPI_LONG_LONG, r, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      piece.resize(static_cast<std::size_t>(std::min(kPiece, size)));
      for (long long at = 0; at < size; at += kPiece) {
        const int n = static_cast<int>(std::min(kPiece, size - at));
        MPI_Recv(piece.data(), n, MPI_BYTE, r, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        write_(piece.data(), static_cast<std::size_t>(n));
      }
    }
  } else {
    long long size = static_cast<long long>(spilled_ ? spilled_bytes_ : kept_.size());
    std::vector<std::byte> piece;
    if (spilled_) {
      piece.resize(static_cast<std::size_t>(std::min(kPiece, size)));
      if (std::fflush(spilled_) != 0 || std::fseek(spilled_, 0, SEEK_SET) != 0) {
        throw Error(ExitCode::runtime,
                    fmt::format("cannot read back this rank's share of the output: {}",
                                std::strerror(errno)));
      }
    }
    MPI_Send(&size, 1, MPI_LONG_LONG, 0, 1, MPI_COMM_WORLD);
    for (long long at = 0; at < size; at += kPiece) {
      const int n = static_cast<int>(std::min(kPiece, size - at));
      const std::byte* bytes = kept_.data() + at;
      if (spilled_) {
        if (std::fread(piece.data(), 1, static_cast<std::size_t>(n), spilled_) !=
            static_cast<std::size_t>(n)) {
          throw Error(ExitCode::runtime,
                      fmt::format("cannot read back this rank's share of the output: {}",
                                  std::strerror(errno)));
        }
        bytes = piece.data();
      }
      MPI_Send(bytes, n, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
    }
    std::vector<std::byte>().swap(kept_);
  }
#endif
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
