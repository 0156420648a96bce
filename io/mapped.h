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

#include <cstddef>
#include <cstdint>

namespace dsjax_io {

// One read-only MAP_SHARED mapping of a whole file (as large as the file was when mapped).
class Mapping {
 public:
  // nullptr-equivalent (data() == nullptr) when the file is empty or cannot be mapped (some
  // FUSE / special files); the engine then reads that file with pread.
  explicit Mapping(int fd);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  int fd() const { return fd_; }
  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  int fd_;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
};

// Installs the SIGBUS handler if the current one is not ours (one sigaction query when it is).
// False when it could not be installed: the caller must then not copy from mappings.
bool EnsureSigbusGuard();

// memcpy(dst, src, len) that returns false instead of crashing when reading src raises SIGBUS
// (file truncated under the mapping, or an I/O error on a mapped page). EnsureSigbusGuard() must
// have run in this process before.
bool GuardedCopy(uint8_t* dst, const uint8_t* src, size_t len);

// True when every page of [p, p + len) is in the page cache (mincore); a cheap sample decides
// whether a batch is served from the mappings (faults on non-resident pages would be synchronous
// disk reads, one per thread) or from the pread pool (many reads in flight).
bool Resident(const uint8_t* p, size_t len);

}  // namespace dsjax_io
