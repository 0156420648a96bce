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
  // max_maps: kind "mmap": at most this many files mapped at once (least recently used ones are
  // unmapped beyond it, and mapped again on demand); 0 = DefaultMaxMappedFiles().
  // Throws std::invalid_argument for bad arguments and std::runtime_error when a thread cannot be
  // started (every thread already started is joined first; the engine owns no file descriptor).
  Engine(int threads, const std::string& kind, unsigned queue_depth, int64_t align, int64_t max_maps = 0);
  ~Engine();

  const std::string& kind() const { return kind_; }
  int threads() const { return pool_.size(); }
  int64_t align() const { return align_; }
  int64_t max_maps() const { return max_maps_; }

  // Reads every request; returns false and fills *failure (lowest failing request) on error.
  // The caller guarantees dst + length <= size of out for every request (module.cc checks).
  // crc: nullptr, or n entries that receive each request's CRC-32 (on success), computed while the
  // data is still in the CPU caches where the path allows.
  bool Read(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc = nullptr);

  // kind "mmap": registers fd for the fast path and maps it now (true) unless max_maps files are
  // mapped already (it is then mapped on first use, evicting the least recently used) or mmap
  // fails (false; that file is then read with pread, counted in Stats::map_failed, and the first
  // failure is kept for TakeMapFailure). Never throws. path is only used in reports.
  // UnmapFile must come before close(fd); it waits for batches in flight.
  bool MapFile(int fd, const std::string& path);
  void UnmapFile(int fd);

  // Records served so far: copied from mappings (mapped), sent to the pread path because they
  // were not in the page cache (deferred) or because their file had no usable mapping (unmapped:
  // mmap failed, more files in one batch than max_maps, a forked child), and mapped copies that
  // raised SIGBUS (faulted). Files: mmap failures, evictions and re-mappings of evicted files,
  // mapped now; pages whose page-table entries the background thread populated.
  struct Stats {
    int64_t mapped, deferred, faulted, unmapped, map_failed, evicted, remapped, mapped_files, populated;
  };
  Stats stats() const;

  // The first mmap failure of this engine not reported yet (once per engine): its file's path
  // and errno. For the binding's warning.
  bool TakeMapFailure(std::string* path, int* err);

  // "madvise" (MADV_POPULATE_READ) or "touch" (one read per page under the SIGBUS guard, used
  // where the kernel lacks MADV_POPULATE_READ: EINVAL). ForceTouchPopulate selects the fallback
  // (tests; a kernel without the advice selects it by itself).
  const char* populate_mode() const { return populate_touch_.load() ? "touch" : "madvise"; }
  void ForceTouchPopulate() { populate_touch_.store(true); }

  // Tests: a helper thread takes the mappings' lock exclusively and holds it for `seconds`;
  // returns once it is held. False when the thread cannot be started.
  bool HoldMapsLockForTest(double seconds);

  // crc[i] = CRC-32 of out[dst[i], dst[i] + length[i]), computed on the pool.
  void Crc32Batch(const uint8_t* out, const int64_t* dst, const int64_t* length, int64_t n, uint32_t* crc);

 private:
  bool ReadUnmapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure);
  bool RunOps(const ReadOp* ops, int64_t n, ReadFailure* failure);
  bool RunDeferred(const ReadOp* ops, int64_t n, ReadFailure* failure);
  // The mmap fast path, under maps_mu_ shared. *handled false: the batch is not served from the
  // mappings (every record uncached or unmapped; counted here) and goes to ReadUnmapped. With
  // `missing` non-null, a record of a registered file evicted earlier stops the pass before any
  // copy: its fd is added to *missing (and *handled is false, nothing counted) so that the caller
  // maps it under the exclusive lock and calls again with missing == nullptr.
  bool ReadMapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc,
                  uint64_t tick, std::vector<int>* missing, bool* handled);

  // engine_maps.cc, all with maps_mu_ held exclusively. Maps registered file fd, first evicting
  // least recently used mappings (only ones last used before `keep`, the current batch's tick;
  // UINT64_MAX: any) when at the cap or when mmap answers ENOMEM. False when it stays unmapped (refused: everything mapped is
  // in use by this batch; or failed: Slot::failed is set and the failure recorded).
  bool MapSlot(int fd, uint64_t keep);
  // Unmaps up to `count` mappings, and more until at least `bytes` are freed, oldest first, only
  // ones whose last_use is below `keep`. Returns how many were unmapped.
  int64_t EvictLru(int64_t count, int64_t bytes, uint64_t keep);
  void MapMissing(std::vector<int>* fds, uint64_t tick);
  void Drop(int fd);  // unmaps and forgets fd's slot

  std::string kind_;
  int64_t align_;
  ThreadPool pool_;
  std::unique_ptr<Uring> uring_;
  std::mutex uring_mu_;  // the ring has one submitter at a time
  std::atomic<bool> nowait_;  // try preadv2(RWF_NOWAIT) on the caller first (buffered fds only)
  pid_t owner_pid_;
  bool mmap_ = false;
  int64_t max_maps_ = 0;

  // One per file descriptor number registered with MapFile.
  struct Slot {
    Mapping* map = nullptr;   // owned; nullptr while not mapped (never mapped yet, evicted, failed)
    bool registered = false;  // MapFile'd and not UnmapFile'd: mapped again on demand
    bool failed = false;      // mmap failed: read with pread until UnmapFile
    std::string path;
  };
  // Readers hold it shared for a whole batch (from the first lookup to the last copy) and the
  // population thread for each step: a mapping is only ever unmapped (UnmapFile, eviction) with
  // it held exclusively, so no thread is ever inside a mapping being unmapped.
  std::shared_mutex maps_mu_;
  std::vector<Slot> slots_;  // by fd
  std::atomic<int64_t> n_live_{0};  // slots with a mapping (written under maps_mu_ exclusive)
  std::atomic<uint64_t> clock_{1};  // one tick per mapped batch: the LRU order
  std::atomic<int64_t> n_mapped_{0}, n_deferred_{0}, n_faulted_{0}, n_unmapped_{0};
  std::atomic<int64_t> n_map_failed_{0}, n_evicted_{0}, n_remapped_{0}, n_populated_{0};
  std::atomic<bool> populate_touch_{false};
  std::mutex report_mu_;
  bool reported_ = false;  // a failure has been recorded (reported or pending)
  std::atomic<bool> report_pending_{false};  // checked without report_mu_ after every batch
  std::string report_path_;
  int report_err_ = 0;
  std::thread lock_holder_;  // HoldMapsLockForTest

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
  void Populate(int fd, const Mapping* job);
  std::unique_ptr<Populator> pop_;
};

// Reads op fully with pread (looping over short reads and EINTR); false + failure on error.
bool PreadOne(const ReadOp& op, int64_t index, ReadFailure* failure);

}  // namespace dsjax_io
