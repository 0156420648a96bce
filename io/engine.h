// The POSIX batch-read engine behind dsjax.io: one call reads a batch of (fd, offset, length)
// requests into one caller-owned buffer, keeping many reads in flight either on a pread thread
// pool or on an io_uring ring, optionally through O_DIRECT with aligned bounce buffers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <shared_mutex>
#include <string>
#include <vector>

#include <sys/types.h>

#include "mapped.h"
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
  // kind: "auto" ("mmap" for buffered reads, "pread" for O_DIRECT; engine.cc says why),
  // "mmap" (page-cache copies from file mappings, the pread pool for what is not cached),
  // "pread" or "io_uring" (throws std::runtime_error when io_uring is unusable here). align: 0 for
  // buffered file descriptors, else the O_DIRECT alignment (a power of two, e.g. 4096) the fds need.
  Engine(int threads, const std::string& kind, unsigned queue_depth, int64_t align);
  ~Engine();

  const std::string& kind() const { return kind_; }
  int threads() const { return pool_.size(); }
  int64_t align() const { return align_; }

  // Reads every request; returns false and fills *failure (lowest failing request) on error.
  // The caller guarantees dst + length <= size of out for every request (module.cc checks).
  // crc: nullptr, or n entries that receive each request's CRC-32 (on success), computed while the
  // data is still in the CPU caches where the path allows.
  bool Read(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc = nullptr);

  // kind "mmap": maps fd for the fast path (false when it cannot be mapped: reads of that fd then
  // use pread). UnmapFile must come before close(fd); it waits for batches in flight.
  bool MapFile(int fd);
  void UnmapFile(int fd);

  // Records served so far: copied from mappings, sent to the pread path, and mapped copies that
  // raised SIGBUS (file truncated under the mapping, or a mapped page's I/O error).
  struct Stats {
    int64_t mapped, deferred, faulted;
  };
  Stats stats() const { return Stats{n_mapped_.load(), n_deferred_.load(), n_faulted_.load()}; }

  // crc[i] = CRC-32 of out[dst[i], dst[i] + length[i]), computed on the pool.
  void Crc32Batch(const uint8_t* out, const int64_t* dst, const int64_t* length, int64_t n, uint32_t* crc);

 private:
  bool ReadUnmapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure);
  bool RunOps(const ReadOp* ops, int64_t n, ReadFailure* failure);
  bool RunDeferred(const ReadOp* ops, int64_t n, ReadFailure* failure);
  // The mmap fast path: false in *handled when the batch is not served from the mappings (an fd
  // without one, a range past the mapped size, or a sampled record not in the page cache).
  bool ReadMapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc,
                  bool* handled);

  std::string kind_;
  int64_t align_;
  ThreadPool pool_;
  std::unique_ptr<Uring> uring_;
  std::mutex uring_mu_;  // the ring has one submitter at a time
  std::atomic<bool> nowait_;  // try preadv2(RWF_NOWAIT) on the caller first (buffered fds only)
  pid_t owner_pid_;
  bool mmap_ = false;
  std::shared_mutex maps_mu_;  // shared by batches in flight, exclusive to map/unmap a file
  std::vector<Mapping*> maps_;  // by fd; owned
  std::atomic<int64_t> n_mapped_{0}, n_deferred_{0}, n_faulted_{0};

  // Background population of the page tables of newly mapped files (engine.cc says why). On the
  // heap so that a forked child can leak it: its condition variable may count the parent's
  // waiting thread, and destroying it would then wait forever.
  struct Populator {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::pair<int, const Mapping*>> queue;
    std::atomic<bool> stop{false};
    std::thread thread;
  };
  void PopulateLoop();
  Populator* pop_ = new Populator();
};

// Reads op fully with pread (looping over short reads and EINTR); false + failure on error.
bool PreadOne(const ReadOp& op, int64_t index, ReadFailure* failure);

}  // namespace dsjax_io
