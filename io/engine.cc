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
// Without MADV_POPULATE_READ (Linux < 5.14) pages are simply faulted in on first use.
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

Engine::Engine(int threads, const std::string& kind, unsigned queue_depth, int64_t align)
    : kind_(kind), align_(align), pool_(std::max(0, threads - 1)), nowait_(align == 0), owner_pid_(getpid()) {
  if (align < 0 || (align & (align - 1)) != 0) {
    throw std::invalid_argument("align must be 0 or a power of two, got " + std::to_string(align));
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
}

Engine::~Engine() {
  if (getpid() == owner_pid_) {
    if (pop_->thread.joinable()) {
      {
        std::lock_guard<std::mutex> lock(pop_->mu);
        pop_->stop.store(true);
      }
      pop_->cv.notify_all();
      pop_->thread.join();
    }
    delete pop_;
  }  // else: a forked child, without the parent's thread; pop_ is leaked (see engine.h)
  for (Mapping* m : maps_) delete m;  // no lock: nobody else can use a dying engine
}

void Engine::PopulateLoop() {
#ifndef MADV_POPULATE_READ
  return;
#else
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);  // only spare CPU time
  const long page_l = sysconf(_SC_PAGESIZE);
  const size_t page = static_cast<size_t>(page_l > 0 ? page_l : 4096);
  constexpr size_t kStepPages = 512;
  std::vector<unsigned char> vec(kStepPages);
  for (;;) {
    std::pair<int, const Mapping*> job;
    {
      std::unique_lock<std::mutex> lock(pop_->mu);
      pop_->cv.wait(lock, [this] { return pop_->stop.load() || !pop_->queue.empty(); });
      if (pop_->stop.load()) return;
      job = pop_->queue.front();
      pop_->queue.pop_front();
    }
    for (size_t off = 0;; off += kStepPages * page) {
      if (pop_->stop.load(std::memory_order_relaxed)) return;
      std::shared_lock<std::shared_mutex> lock(maps_mu_);
      const int fd = job.first;
      const Mapping* m = static_cast<size_t>(fd) < maps_.size() ? maps_[fd] : nullptr;
      if (m != job.second || off >= static_cast<size_t>(m->size())) break;  // unmapped, replaced or done
      const uint8_t* base = m->data() + off;
      const size_t len = std::min(kStepPages * page, static_cast<size_t>(m->size()) - off);
      const size_t pages = (len + page - 1) / page;
      if (mincore(const_cast<uint8_t*>(base), len, vec.data()) != 0) break;
      for (size_t k = 0; k < pages;) {
        if ((vec[k] & 1) == 0) {
          ++k;
          continue;
        }
        size_t j = k;
        while (j < pages && (vec[j] & 1) != 0) ++j;
        // Errors (EINVAL: kernel too old; EFAULT: file truncated) just end the population.
        if (madvise(const_cast<uint8_t*>(base) + k * page, std::min(j * page, len) - k * page, MADV_POPULATE_READ) != 0 &&
            errno != EINTR && errno != EAGAIN) {
          if (errno == EINVAL) return;
          off = static_cast<size_t>(m->size());
          break;
        }
        k = j;
      }
    }
  }
#endif
}

bool Engine::MapFile(int fd) {
  // A forked child never touches the mappings' lock: the parent may have held it at fork time
  // (a reader, or the population thread that does not exist in the child); it reads by pread.
  if (!mmap_ || fd < 0 || getpid() != owner_pid_) return false;
  auto* m = new Mapping(fd);
  if (m->data() == nullptr) {
    delete m;
    // Drop a stale mapping of a descriptor number closed without UnmapFile: reads of this fd
    // must go to pread, never to the old file's bytes.
    std::unique_lock<std::shared_mutex> lock(maps_mu_);
    if (static_cast<size_t>(fd) < maps_.size()) {
      delete maps_[fd];
      maps_[fd] = nullptr;
    }
    return false;
  }
  std::unique_lock<std::shared_mutex> lock(maps_mu_);
  if (maps_.size() <= static_cast<size_t>(fd)) maps_.resize(static_cast<size_t>(fd) + 1, nullptr);
  delete maps_[fd];  // a stale mapping of a descriptor number closed without UnmapFile
  maps_[fd] = m;
  lock.unlock();
  if (getpid() == owner_pid_) {
    {
      std::lock_guard<std::mutex> pop_lock(pop_->mu);
      if (!pop_->thread.joinable()) pop_->thread = std::thread([this] { PopulateLoop(); });
      pop_->queue.emplace_back(fd, m);
    }
    pop_->cv.notify_one();
  }
  return true;
}

void Engine::UnmapFile(int fd) {
  if (getpid() != owner_pid_) return;  // a forked child: see MapFile; ~Engine frees the mappings
  std::unique_lock<std::shared_mutex> lock(maps_mu_);
  if (fd >= 0 && static_cast<size_t>(fd) < maps_.size()) {
    delete maps_[fd];
    maps_[fd] = nullptr;
  }
}

bool Engine::ReadMapped(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure, uint32_t* crc,
                        bool* handled) {
  *handled = false;
  std::vector<const uint8_t*> src(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const Request& r = reqs[i];
    const Mapping* m = static_cast<size_t>(r.fd) < maps_.size() ? maps_[r.fd] : nullptr;
    if (m == nullptr || r.offset > m->size() || r.length > m->size() - r.offset) return true;
    src[i] = m->data() + r.offset;
  }
  // Which records to copy from the mappings: a fault on an uncached page is a synchronous disk
  // read (one per thread), so uncached records go to the pread pool instead. A residency check
  // (mincore) costs ~0.75 us, about a warm 4 KiB pread, so large records are each checked (cheap
  // next to their copy), while small ones are judged on a sample of up to kSample of them: all
  // of the batch's small records take the mappings only if every sampled one is cached. With a
  // partly cached data set a few uncached small records can slip through a passing sample (at
  // worst ~2% of the batch, for 16 samples); they are still read correctly, at fault speed.
  constexpr int64_t kLarge = 32 << 10;
  constexpr int64_t kSample = 16;
  std::vector<uint8_t> deferred(static_cast<size_t>(n), 0);
  int64_t small = 0;
  for (int64_t i = 0; i < n; ++i) {
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
      if (reqs[i].length >= kLarge) continue;
      if (k++ % every == 0) cached = Resident(src[i], static_cast<size_t>(reqs[i].length));
    }
    if (!cached) {
      for (int64_t i = 0; i < n; ++i) deferred[i] |= reqs[i].length < kLarge;
    }
  }
  int64_t n_deferred = 0;
  for (int64_t i = 0; i < n; ++i) n_deferred += deferred[i];
  if (n_deferred == n) return true;  // nothing cached: the pread path takes the whole batch
  if (!EnsureSigbusGuard()) return true;  // no guard, no mapped copies: pread takes the batch
  *handled = true;

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
  n_deferred_.fetch_add(n_deferred, std::memory_order_relaxed);
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
  if (mmap_ && getpid() == owner_pid_) {  // a forked child reads by pread (see MapFile)
    std::shared_lock<std::shared_mutex> lock(maps_mu_);  // mappings stay valid for the whole batch
    bool handled = false;
    const bool ok = ReadMapped(reqs, n, out, failure, crc, &handled);
    if (handled) return ok;
    n_deferred_.fetch_add(n, std::memory_order_relaxed);
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
