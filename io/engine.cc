// Batch-read engine (see engine.h).
//
// Choice of backend for kind="auto" (buffered reads): "mmap". With a warm page cache the cost of a
// small-record read is the syscall, not the copy: a 4 KiB pread costs ~0.8 us on the 2-core dev VM,
// a memcpy from an already-mapped page ~0.3 us. So each file is also mapped read-only, and a batch
// whose records are in the page cache is copied straight out of the mappings (caller plus one
// thread per spare core, no syscall per record, each record's CRC-32 computed while it is hot).
// Records that are not cached go to the pread pool instead (ReadMapped says how that is decided:
// a fault on an uncached page is a synchronous disk read, one per thread, whereas the pool keeps
// many reads in flight). Copies run under a SIGBUS guard (mapped.h), and every file's
// size is checked after the copies, so a file truncated under the reader gives the same
// end-of-file error as pread, never a crash or silently zero-filled bytes.
//
// Page tables: a fresh mapping has none, and the first touch of every 64 KiB window (the kernel's
// fault-around) costs a page fault, so the first random pass over a large cached data set would
// pay about what pread costs. A background thread at nice 19 therefore populates each new
// mapping's cached pages (mincore, then MADV_POPULATE_READ on resident runs only: never disk I/O)
// ~9 ms per 100 MiB here, in 2 MiB steps so that closing a file waits for at most one step.
// Without MADV_POPULATE_READ (Linux < 5.14: EINVAL) it reads one byte per resident page instead,
// under the SIGBUS guard (engine_maps.cc). At most Engine::max_maps() files are mapped at once
// (each mapping is a VMA counted against vm.max_map_count); engine_maps.cc manages that cap.
//
// Batches that are not served from the mappings (and kinds "pread" / "io_uring"): before handing a
// batch to the pool or the ring, the calling thread tries every read with preadv2(RWF_NOWAIT),
// which copies from the page cache and returns EAGAIN instead of blocking on the device. Warm
// batches thus cost no thread hand-off at all (waking workers costs more than a 4 KiB copy), and
// only the reads that must wait for the device go to the pool/ring. With a warm page cache a
// buffered io_uring read completes inline in io_uring_enter, on the submitting thread, so io_uring
// pays off for O_DIRECT and cold reads, where it keeps a deep queue without one thread per read.
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "crc32.h"

namespace dsjax_io {

bool PreadOne(const ReadOp& op, int64_t index, ReadFailure* failure) {
  int64_t got = 0;
  while (got < op.want) {
    const size_t chunk = static_cast<size_t>(std::min<int64_t>(op.want - got, int64_t{1} << 30));
    const ssize_t r = pread(op.fd, op.dst + got, chunk, op.offset + got);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      *failure = ReadFailure{index, errno, got};
      return false;
    }
    if (r == 0) break;
    got += r;
  }
  if (got < op.need) {
    *failure = ReadFailure{index, 0, got};
    return false;
  }
  return true;
}

Engine::Engine(int threads, const std::string& kind, unsigned queue_depth, int64_t align, int64_t max_maps)
    : kind_(kind), align_(align), pool_(std::max(0, threads - 1)), nowait_(align == 0), owner_pid_(getpid()) {
  if (align < 0 || (align & (align - 1)) != 0) {
    throw std::invalid_argument("align must be 0 or a power of two, got " + std::to_string(align));
  }
  if (max_maps < 0) {
    throw std::invalid_argument("max_mapped_files must be >= 0 (0: the default), got " + std::to_string(max_maps));
  }
  if (pool_.start_error() != 0) {  // the pool joined the threads it had started
    throw std::runtime_error("could not start " + std::to_string(threads - 1) + " reader threads: " +
                             std::strerror(pool_.start_error()) +
                             " (RLIMIT_NPROC, the cgroup's pids.max or the address space); use fewer threads");
  }
  if (kind == "io_uring") {
    uring_ = Uring::Create(std::max(1u, queue_depth));
    if (!uring_) {
      throw std::runtime_error(
          "kind='io_uring' was requested but io_uring is not usable here (no kernel support, "
          "io_uring_disabled, or blocked by seccomp); use kind='pread' or 'auto'");
    }
  } else if (kind == "mmap" && align != 0) {
    throw std::invalid_argument("kind='mmap' reads through the page cache and cannot be combined with O_DIRECT (align=" +
                                std::to_string(align) + "); use kind='pread' or 'io_uring'");
  } else if (kind == "mmap" || (kind == "auto" && align == 0)) {
    kind_ = "mmap";
    mmap_ = true;
  } else if (kind == "auto" || kind == "pread") {
    kind_ = "pread";
  } else {
    throw std::invalid_argument("kind must be 'auto', 'mmap', 'pread' or 'io_uring', got '" + kind + "'");
  }
  if (mmap_) {
    max_maps_ = max_maps > 0 ? max_maps : DefaultMaxMappedFiles();
    // Started here, not on the first MapFile: a failure is then this constructor's error, before
    // the caller has opened any file, instead of an exception in the middle of registering one.
    pop_.reset(new Populator());
    try {
      pop_->thread = std::thread([this] { PopulateLoop(); });
    } catch (const std::system_error& e) {
      throw std::runtime_error(std::string("could not start the mmap engine's page-table thread: ") + e.what() +
                               "; use kind='pread'");
    }
  }
}

Engine::~Engine() {
  if (getpid() == owner_pid_) {
    if (lock_holder_.joinable()) lock_holder_.join();
    if (pop_ && pop_->thread.joinable()) {
      {
        std::lock_guard<std::mutex> lock(pop_->mu);
        pop_->stop.store(true);
      }
      pop_->cv.notify_all();
      pop_->thread.join();
    }
  } else {
    // A forked child, without the parent's threads: leaked, never joined (see engine.h).
    (void)pop_.release();
    if (lock_holder_.joinable()) new (std::nothrow) std::thread(std::move(lock_holder_));
  }
  for (Slot& s : slots_) delete s.map;  // no lock: nobody else can use a dying engine
}

Engine::Stats Engine::stats() const {
  return Stats{n_mapped_.load(),     n_deferred_.load(), n_faulted_.load(),
               n_unmapped_.load(),   n_map_failed_.load(), n_evicted_.load(),
               n_remapped_.load(),   n_live_.load(),
               n_populated_.load()};
}

bool Engine::ReadMapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc,
                        uint64_t tick, std::vector<int>* missing, bool* handled) {
  *handled = false;
  // deferred[i]: 0 = copied from the mapping, 1 = not cached (pread), 2 = no usable mapping (pread).
  std::vector<uint8_t> deferred(static_cast<size_t>(n), 0);
  std::vector<const uint8_t*> src(static_cast<size_t>(n));
  const size_t n_slots = slots_.size();
  for (int64_t i = 0; i < n; ++i) {
    const Request& r = reqs[i];
    const Slot* slot = static_cast<size_t>(r.fd) < n_slots ? &slots_[r.fd] : nullptr;
    Mapping* m = slot != nullptr ? slot->map : nullptr;
    if (m == nullptr) {
      if (missing != nullptr && slot != nullptr && slot->registered && !slot->failed) {
        missing->push_back(r.fd);  // evicted earlier: the caller maps it again, then calls back
      }
      deferred[i] = 2;
      continue;
    }
    // Compare first, and only raise: concurrent batches would otherwise keep stealing the line.
    if (m->last_use.load(std::memory_order_relaxed) < tick) m->last_use.store(tick, std::memory_order_relaxed);
    if (r.offset > m->size() || r.length > m->size() - r.offset) {  // past the mapped size: pread decides
      deferred[i] = 2;
      continue;
    }
    src[i] = m->data() + r.offset;
  }
  if (missing != nullptr && !missing->empty()) return true;
  // Which records to copy from the mappings: a fault on an uncached page is a synchronous disk
  // read (one per thread), so uncached records go to the pread pool instead. A residency check
  // (mincore) costs ~0.75 us, about a warm 4 KiB pread, so large records are each checked (cheap
  // next to their copy), while small ones are judged on a sample of up to kSample of them: all
  // of the batch's small records take the mappings only if every sampled one is cached. With a
  // partly cached data set a few uncached small records can slip through a passing sample (at
  // worst ~2% of the batch, for 16 samples); they are still read correctly, at fault speed.
  constexpr int64_t kLarge = 32 << 10;
  constexpr int64_t kSample = 16;
  int64_t small = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (deferred[i] != 0) continue;
    if (reqs[i].length >= kLarge) {
      deferred[i] = !Resident(src[i], static_cast<size_t>(reqs[i].length));
    } else {
      ++small;
    }
  }
  if (small > 0) {
    const int64_t every = std::max<int64_t>(1, small / kSample);
    bool cached = true;
    for (int64_t i = 0, k = 0; i < n && cached; ++i) {
      if (deferred[i] != 0 || reqs[i].length >= kLarge) continue;
      if (k++ % every == 0) cached = Resident(src[i], static_cast<size_t>(reqs[i].length));
    }
    if (!cached) {
      for (int64_t i = 0; i < n; ++i) {
        if (deferred[i] == 0 && reqs[i].length < kLarge) deferred[i] = 1;
      }
    }
  }
  int64_t n_deferred = 0, n_unmapped = 0;
  for (int64_t i = 0; i < n; ++i) {
    n_deferred += deferred[i] == 1;
    n_unmapped += deferred[i] == 2;
  }
  const bool guard = n_deferred + n_unmapped < n && EnsureSigbusGuard();
  if (!guard) {  // nothing to copy (or no guard, hence no mapped copies): pread takes the batch
    n_deferred_.fetch_add(n_deferred, std::memory_order_relaxed);
    n_unmapped_.fetch_add(n - n_deferred, std::memory_order_relaxed);
    return true;
  }
  *handled = true;
  n_deferred += n_unmapped;  // from here on both kinds go the same (pread) way

  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int helpers = static_cast<int>(std::min<int64_t>({pool_.size(), cores - 1, (n - n_deferred) / 64}));
  constexpr int64_t kChunk = 16;
  std::vector<uint8_t> faulted(static_cast<size_t>(n), 0);
  // Records sit at random places in memory far larger than the CPU caches, so each copy starts
  // with DRAM (and page-walk) misses the hardware prefetcher cannot foresee; prefetching the head
  // of the record kAhead places ahead overlaps them with the current copy (0.50 -> 0.30 us per
  // random 4 KiB record over 800 MiB here). A prefetch never faults, even past a truncated end.
  constexpr int64_t kAhead = 2;
  constexpr size_t kPrefetchBytes = 8 << 10;
  auto prefetch = [&](int64_t j) {
    if (deferred[j]) return;
    const uint8_t* p = src[j];
    const size_t len = std::min(static_cast<size_t>(reqs[j].length), kPrefetchBytes);
    for (size_t b = 0; b < len; b += 64) __builtin_prefetch(p + b, 0, 0);
  };
  pool_.Run((n + kChunk - 1) / kChunk, helpers, [&](int64_t c) {
    const int64_t first = c * kChunk, end = std::min(n, first + kChunk);
    for (int64_t j = first; j < std::min(end, first + kAhead); ++j) prefetch(j);
    for (int64_t i = first; i < end; ++i) {
      if (i + kAhead < end) prefetch(i + kAhead);
      if (deferred[i]) continue;
      const size_t len = static_cast<size_t>(reqs[i].length);
      uint8_t* dst = out + reqs[i].dst;
      if (!GuardedCopy(dst, src[i], len)) {
        faulted[i] = 1;
      } else if (crc != nullptr) {
        crc[i] = Crc32(0, dst, len);  // while the record is in this core's caches
      }
    }
  });

  int64_t n_faulted = 0;
  for (int64_t i = 0; i < n; ++i) n_faulted += faulted[i];
  n_mapped_.fetch_add(n - n_deferred, std::memory_order_relaxed);
  n_deferred_.fetch_add(n_deferred - n_unmapped, std::memory_order_relaxed);
  n_unmapped_.fetch_add(n_unmapped, std::memory_order_relaxed);
  n_faulted_.fetch_add(n_faulted, std::memory_order_relaxed);

  // The uncached records: the pread path (RWF_NOWAIT first, then the pool), many in flight.
  ReadFailure deferred_failure;
  bool deferred_ok = true;
  if (n_deferred > 0) {
    std::vector<ReadOp> ops;
    std::vector<int64_t> orig;
    ops.reserve(static_cast<size_t>(n_deferred));
    orig.reserve(static_cast<size_t>(n_deferred));
    for (int64_t i = 0; i < n; ++i) {
      if (!deferred[i]) continue;
      ops.push_back(ReadOp{reqs[i].fd, reqs[i].offset, reqs[i].length, reqs[i].length, out + reqs[i].dst});
      orig.push_back(i);
    }
    deferred_ok = RunOps(ops.data(), n_deferred, &deferred_failure);
    if (!deferred_ok) {
      deferred_failure.index = orig[deferred_failure.index];
    } else if (crc != nullptr) {
      pool_.Run(n_deferred, 0, [&](int64_t k) {
        const int64_t i = orig[k];
        crc[i] = Crc32(0, out + reqs[i].dst, static_cast<size_t>(reqs[i].length));
      });
    }
  }

  // A file that shrank since it was mapped: pages wholly past the new end raised SIGBUS (caught),
  // but the tail of the last page reads as zeros without any fault, so sizes are checked after the
  // copies, once per distinct file of the batch.
  std::vector<int> fds;
  fds.reserve(static_cast<size_t>(n - n_deferred));
  for (int64_t i = 0; i < n; ++i) {
    if (!deferred[i]) fds.push_back(reqs[i].fd);
  }
  std::sort(fds.begin(), fds.end());
  fds.erase(std::unique(fds.begin(), fds.end()), fds.end());
  std::vector<int64_t> size(fds.size(), 0);
  std::vector<int> stat_err(fds.size(), 0);
  for (size_t k = 0; k < fds.size(); ++k) {
    struct stat st;
    if (fstat(fds[k], &st) != 0) {
      stat_err[k] = errno;
    } else {
      size[k] = static_cast<int64_t>(st.st_size);
    }
  }
  for (int64_t i = 0; i < n; ++i) {  // in order: the first failure found is the lowest index
    if (!deferred_ok && deferred_failure.index == i) {
      *failure = deferred_failure;
      return false;
    }
    if (deferred[i]) continue;
    const Request& r = reqs[i];
    const size_t k = static_cast<size_t>(std::lower_bound(fds.begin(), fds.end(), r.fd) - fds.begin());
    if (stat_err[k] != 0) {
      *failure = ReadFailure{i, stat_err[k], 0};
      return false;
    }
    if (r.length > 0 && r.offset + r.length > size[k]) {
      *failure = ReadFailure{i, 0, std::max<int64_t>(0, std::min(r.length, size[k] - r.offset))};
      return false;
    }
    if (faulted[i]) {  // SIGBUS inside the file's size: an I/O error on the mapped page
      *failure = ReadFailure{i, EIO, 0};
      return false;
    }
  }
  return true;
}

bool Engine::RunOps(const ReadOp* ops, int64_t n, ReadFailure* failure) {
#ifdef RWF_NOWAIT
  if (nowait_.load(std::memory_order_relaxed)) {
    // Copies from the page cache use CPU, not queue depth: one extra thread per spare core, and
    // only for batches big enough (64 reads per thread) to repay waking it.
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int helpers = static_cast<int>(std::min<int64_t>({pool_.size(), cores - 1, n / 64}));
    constexpr int64_t kChunk = 16;
    std::vector<int64_t> got(static_cast<size_t>(n), -1);  // -1: complete; else bytes read so far
    std::atomic<bool> unsupported{false};
    pool_.Run((n + kChunk - 1) / kChunk, helpers, [&](int64_t c) {
      for (int64_t i = c * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
        const ReadOp& op = ops[i];
        if (op.want == 0) continue;
        iovec iov{op.dst, static_cast<size_t>(std::min<int64_t>(op.want, int64_t{1} << 30))};
        const ssize_t r = unsupported.load(std::memory_order_relaxed) ? -1 : preadv2(op.fd, &iov, 1, op.offset, RWF_NOWAIT);
        if (r == op.want) continue;
        if (r < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
          unsupported.store(true, std::memory_order_relaxed);
        }
        got[i] = r > 0 ? r : 0;
      }
    });
    if (unsupported.load()) nowait_.store(false, std::memory_order_relaxed);  // this file system cannot
    std::vector<ReadOp> rest;
    std::vector<int64_t> orig;
    for (int64_t i = 0; i < n; ++i) {
      if (got[i] < 0) continue;
      const ReadOp& op = ops[i];
      const int64_t g = got[i];
      rest.push_back(ReadOp{op.fd, op.offset + g, op.want - g, std::max<int64_t>(0, op.need - g), op.dst + g});
      orig.push_back(i);
    }
    if (rest.empty()) return true;
    const bool ok = RunDeferred(rest.data(), static_cast<int64_t>(rest.size()), failure);
    if (!ok) {
      failure->got += got[orig[failure->index]];
      failure->index = orig[failure->index];
    }
    return ok;
  }
#endif
  return RunDeferred(ops, n, failure);
}

bool Engine::RunDeferred(const ReadOp* ops, int64_t n, ReadFailure* failure) {
  if (uring_ && n > 1 && getpid() == owner_pid_) {  // a forked child must not share the parent's ring
    std::lock_guard<std::mutex> lock(uring_mu_);
    return uring_->ReadAll(ops, n, failure);
  }
  if (n == 1) return PreadOne(ops[0], 0, failure);  // no hand-off for a single record
  std::mutex mu;
  bool ok = true;
  pool_.Run(n, pool_.size(), [&](int64_t i) {
    ReadFailure f;
    if (!PreadOne(ops[i], i, &f)) {
      std::lock_guard<std::mutex> lock(mu);
      if (ok || f.index < failure->index) *failure = f;  // report the lowest index: deterministic
      ok = false;
    }
  });
  return ok;
}

bool Engine::Read(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc) {
  if (n <= 0) return true;
  if (mmap_ && getpid() == owner_pid_) {
    const uint64_t tick = clock_.fetch_add(1, std::memory_order_relaxed) + 1;
    std::vector<int> missing;
    for (int attempt = 0; attempt < 2; ++attempt) {
      bool handled = false;
      {
        std::shared_lock<std::shared_mutex> lock(maps_mu_);  // mappings stay valid for the whole batch
        const bool ok = ReadMapped(reqs, n, out, failure, crc, tick, attempt == 0 ? &missing : nullptr, &handled);
        if (handled) return ok;
      }
      if (missing.empty()) break;  // counted by ReadMapped: the pread path takes the whole batch
      MapMissing(&missing, tick);  // evicted files of this batch, mapped again (exclusive lock)
    }
  } else if (mmap_) {
    // A forked child never touches the mappings' lock: the parent may have held it at fork time
    // (a reader, the population thread or a map/unmap) and that thread does not exist here.
    n_unmapped_.fetch_add(n, std::memory_order_relaxed);
  }
  if (!ReadUnmapped(reqs, n, out, failure)) return false;
  if (crc != nullptr) {
    std::vector<int64_t> dst(static_cast<size_t>(n)), length(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = reqs[i].dst;
      length[i] = reqs[i].length;
    }
    Crc32Batch(out, dst.data(), length.data(), n, crc);
  }
  return true;
}

bool Engine::ReadUnmapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure) {
  std::vector<ReadOp> ops(static_cast<size_t>(n));
  if (align_ == 0) {
    for (int64_t i = 0; i < n; ++i) {
      ops[i] = ReadOp{reqs[i].fd, reqs[i].offset, reqs[i].length, reqs[i].length, out + reqs[i].dst};
    }
    return RunOps(ops.data(), n, failure);
  }
  // O_DIRECT: offsets, lengths and buffer addresses must be aligned, so each request reads the
  // aligned span around it into an aligned scratch buffer and is copied out afterwards.
  const int64_t a = align_;
  std::vector<int64_t> scratch_off(static_cast<size_t>(n));
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t begin = reqs[i].offset / a * a;
    const int64_t end = reqs[i].offset + reqs[i].length;
    const int64_t span = reqs[i].length == 0 ? 0 : (end - begin + a - 1) / a * a;
    ops[i] = ReadOp{reqs[i].fd, begin, span, reqs[i].length == 0 ? 0 : end - begin, nullptr};
    scratch_off[i] = total;
    total += span;
  }
  void* raw = nullptr;
  if (posix_memalign(&raw, static_cast<size_t>(std::max<int64_t>(a, 64)), static_cast<size_t>(std::max<int64_t>(total, a))) != 0) {
    *failure = ReadFailure{0, ENOMEM, 0};
    return false;
  }
  std::unique_ptr<void, decltype(&free)> scratch(raw, &free);
  auto* base = static_cast<uint8_t*>(raw);
  for (int64_t i = 0; i < n; ++i) ops[i].dst = base + scratch_off[i];
  if (!RunOps(ops.data(), n, failure)) {
    const Request& r = reqs[failure->index];  // report bytes of the request, not of its span
    failure->got = std::min(r.length, std::max<int64_t>(0, failure->got - (r.offset - ops[failure->index].offset)));
    return false;
  }
  pool_.Run(n, pool_.size(), [&](int64_t i) {
    if (reqs[i].length > 0) {
      std::memcpy(out + reqs[i].dst, base + scratch_off[i] + (reqs[i].offset - ops[i].offset),
                  static_cast<size_t>(reqs[i].length));
    }
  });
  return true;
}

void Engine::Crc32Batch(const uint8_t* out, const int64_t* dst, const int64_t* length, int64_t n,
                        uint32_t* crc) {
  // A helper per 512 KiB: below that, waking a thread costs more than it computes.
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += length[i];
  const int helpers = static_cast<int>(std::min<int64_t>(pool_.size(), total >> 19));
  pool_.Run(n, helpers, [&](int64_t i) {
    crc[i] = Crc32(0, out + dst[i], static_cast<size_t>(length[i]));
  });
}

}  // namespace dsjax_io
