// The POSIX batch-read engine behind dsjax.io: one call reads a batch of (fd, offset, length)
// requests into one caller-owned buffer, keeping many reads in flight either on a pread thread
// pool or on an io_uring ring, optionally through O_DIRECT with aligned bounce buffers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <sys/types.h>

#include "thread_pool.h"
#include "uring.h"

namespace dsjax_io {

struct Request {
  int fd;
  int64_t offset;  // in the file
  int64_t length;  // bytes to read
  int64_t dst;     // where in the output buffer
};

class Engine {
 public:
  // kind: "auto" (the pread pool; engine.cc says why), "pread" or "io_uring" (throws
  // std::runtime_error when io_uring is unusable here). align: 0 for buffered
  // file descriptors, else the O_DIRECT alignment (a power of two, e.g. 4096) the fds need.
  Engine(int threads, const std::string& kind, unsigned queue_depth, int64_t align);

  const std::string& kind() const { return kind_; }
  int threads() const { return pool_.size(); }
  int64_t align() const { return align_; }

  // Reads every request; returns false and fills *failure (lowest failing request) on error.
  // The caller guarantees dst + length <= size of out for every request (module.cc checks).
  bool Read(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure);

  // crc[i] = CRC-32 of out[dst[i], dst[i] + length[i]), computed on the pool.
  void Crc32Batch(const uint8_t* out, const int64_t* dst, const int64_t* length, int64_t n, uint32_t* crc);

 private:
  bool RunOps(const ReadOp* ops, int64_t n, ReadFailure* failure);
  bool RunDeferred(const ReadOp* ops, int64_t n, ReadFailure* failure);

  std::string kind_;
  int64_t align_;
  ThreadPool pool_;
  std::unique_ptr<Uring> uring_;
  std::mutex uring_mu_;  // the ring has one submitter at a time
  std::atomic<bool> nowait_;  // try preadv2(RWF_NOWAIT) on the caller first (buffered fds only)
  pid_t owner_pid_;
};

// Reads op fully with pread (looping over short reads and EINTR); false + failure on error.
bool PreadOne(const ReadOp& op, int64_t index, ReadFailure* failure);

}  // namespace dsjax_io
