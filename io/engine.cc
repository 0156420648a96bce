// Batch-read engine (see engine.h).
//
// Choice of backend for kind="auto": the pread pool. With a warm page cache a buffered io_uring
// read completes inline in io_uring_enter, on the submitting thread, so it gains nothing there;
// io_uring pays off for O_DIRECT and cold reads, where it keeps a deep queue without one thread
// per read. Users pick it with kind="io_uring".
//
// Cached data first: before handing a batch to the pool or the ring, the calling thread tries
// every read with preadv2(RWF_NOWAIT), which copies from the page cache and returns EAGAIN instead
// of blocking on the device. Warm batches thus cost no thread hand-off at all (waking workers costs
// more than a 4 KiB copy), and only the reads that must wait for the device go to the pool/ring.
#include "engine.h"

#include <errno.h>
#include <stdlib.h>
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
  } else if (kind == "auto" || kind == "pread") {
    kind_ = "pread";
  } else {
    throw std::invalid_argument("kind must be 'auto', 'pread' or 'io_uring', got '" + kind + "'");
  }
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

bool Engine::Read(const Request* reqs, int64_t n, uint8_t* out, ReadFailure* failure) {
  if (n <= 0) return true;
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
