// Read-only file mappings for the page-cache fast path of the batch-read engine, and the SIGBUS
// guard that makes copying out of them safe when a file shrinks under an open reader.
//
// Why a mapping: a warm 4 KiB pread costs ~0.8 us here (syscall entry plus the kernel's page-cache
// lookup and copy), a memcpy from an already-mapped page ~0.3 us; for small records the syscall
// is most of the cost. Why a guard: touching a mapped page that lies wholly past the end of a file
// raises SIGBUS, which would kill the process; FFRecord files are immutable, but a truncated file
// must still give an error naming the file and sample, never a crash.
//
// The guard is a per-thread sigsetjmp region around each copy and a process-wide SIGBUS handler
// that siglongjmps back only when the faulting address lies inside the source range the current
// thread is copying. Any other SIGBUS goes to the handler that was installed before ours (Python's
// faulthandler, a user's handler) or, if there was none, gets the default action (core dump), so
// nothing else changes behaviour. The handler is (re)installed lazily before every guarded batch:
// a handler installed after ours (e.g. faulthandler enabled later) is chained in turn.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace dsjax_io {

// One read-only MAP_SHARED mapping of a whole file (as large as the file was when mapped).
class Mapping {
 public:
  // data() == nullptr when the file is empty or cannot be mapped; error() then says why (the
  // errno of fstat/mmap: ENODEV on a file system without mmap, ENOMEM when vm.max_map_count or
  // the address space is exhausted, EACCES on a write-only fd; ENODEV for a non-regular file;
  // 0 for an empty file). The engine then reads that file with pread. Never throws.
  explicit Mapping(int fd);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  int fd() const { return fd_; }
  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  int error() const { return error_; }

  // Engine-wide "clock" value of the newest batch that used this mapping (the LRU key). Raised
  // with relaxed stores by readers holding the engine's lock shared (a racing older batch may
  // lower it again: harmless, eviction is a heuristic and batches re-check their mappings); read
  // under the lock exclusive. On its own cache line: every record's lookup reads data_ and size_,
  // which must not be invalidated by these stores from other cores.
  alignas(64) std::atomic<uint64_t> last_use{0};

 private:
  int fd_;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
  int error_ = 0;
};

// Live mappings in this process (all engines): each one is a VMA, counted against
// vm.max_map_count together with every other mapping of the process (malloc arenas, thread
// stacks, shared libraries, XLA's buffers).
int64_t LiveMappings();

// The default cap on mapped files, per engine and for all engines of the process together: half
// of /proc/sys/vm/max_map_count (65530 by default -> 32765), leaving the other half to the rest
// of the process; 32765 where that file cannot be read. At least 1.
int64_t DefaultMaxMappedFiles();

// Installs the SIGBUS handler if the current one is not ours (one sigaction query when it is).
// False when it could not be installed: the caller must then not copy from mappings.
bool EnsureSigbusGuard();

// memcpy(dst, src, len) that returns false instead of crashing when reading src raises SIGBUS
// (file truncated under the mapping, or an I/O error on a mapped page). EnsureSigbusGuard() must
// have run in this process before.
bool GuardedCopy(uint8_t* dst, const uint8_t* src, size_t len);

// Reads one byte of every page of [p, p + len) under the SIGBUS guard, which makes the kernel map
// those pages (and, by fault-around, their cached neighbours) into the page tables: the fallback
// of MADV_POPULATE_READ on kernels older than 5.14. False if a page raised SIGBUS (the file
// shrank). Only meant for pages known to be in the page cache: others are read from the device.
bool GuardedTouch(const uint8_t* p, size_t len);

// True when every page of [p, p + len) is in the page cache (mincore); a cheap sample decides
// whether a batch is served from the mappings (faults on non-resident pages would be synchronous
// disk reads, one per thread) or from the pread pool (many reads in flight).
bool Resident(const uint8_t* p, size_t len);

}  // namespace dsjax_io
