// Raw-syscall io_uring reader (see uring.h). Memory ordering follows the io_uring ABI: the
// application publishes SQ tail and CQ head with release stores and reads the kernel's SQ head and
// CQ tail with acquire loads.
#include "uring.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>

#if __has_include(<linux/io_uring.h>) && defined(__NR_io_uring_setup) && defined(__NR_io_uring_enter)
#include <linux/io_uring.h>
#define DSJAX_HAVE_IO_URING 1
#else
#define DSJAX_HAVE_IO_URING 0
#endif

namespace dsjax_io {

#if DSJAX_HAVE_IO_URING

struct Uring::Rings {
  int fd = -1;
  void* sq_ptr = MAP_FAILED;
  size_t sq_len = 0;
  void* cq_ptr = MAP_FAILED;
  size_t cq_len = 0;
  io_uring_sqe* sqes = nullptr;
  size_t sqes_len = 0;
  unsigned *sq_head = nullptr, *sq_tail = nullptr, *sq_mask = nullptr, *sq_array = nullptr;
  unsigned sq_entries = 0;
  unsigned *cq_head = nullptr, *cq_tail = nullptr, *cq_mask = nullptr;
  io_uring_cqe* cqes = nullptr;

  ~Rings() {
    if (sqes != nullptr) munmap(sqes, sqes_len);
    if (cq_ptr != MAP_FAILED && cq_ptr != sq_ptr) munmap(cq_ptr, cq_len);
    if (sq_ptr != MAP_FAILED) munmap(sq_ptr, sq_len);
    if (fd >= 0) close(fd);
  }
};

namespace {

int Enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

// Reads one byte of /dev/zero through the ring: some kernels set up rings but lack IORING_OP_READ
// (< 5.6) or are filtered by seccomp on io_uring_enter.
bool Probe(Uring* ring) {
  int fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;  // cannot probe; the first real read will report any problem
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};  // closed on every exit, a std::bad_alloc from ReadAll included
  uint8_t byte = 1;
  ReadOp op{fd, 0, 1, 1, &byte};
  ReadFailure failure;
  return ring->ReadAll(&op, 1, &failure) && byte == 0;
}

}  // namespace

std::unique_ptr<Uring> Uring::Create(unsigned entries) {
  // Everything that can fail to allocate comes before the ring's fd exists: from then on the
  // fd belongs to Rings, whose destructor closes it on every return below.
  std::unique_ptr<Uring> ring(new (std::nothrow) Uring());
  if (!ring) return nullptr;
  ring->r_.reset(new (std::nothrow) Rings());
  if (!ring->r_) return nullptr;
  io_uring_params p;
  std::memset(&p, 0, sizeof(p));
  int fd = static_cast<int>(syscall(__NR_io_uring_setup, entries, &p));
  if (fd < 0) return nullptr;
  Rings& r = *ring->r_;
  r.fd = fd;
  r.sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r.cq_len = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  const bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single) r.sq_len = r.cq_len = std::max(r.sq_len, r.cq_len);
  r.sq_ptr = mmap(nullptr, r.sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (r.sq_ptr == MAP_FAILED) return nullptr;
  r.cq_ptr = single ? r.sq_ptr
                    : mmap(nullptr, r.cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                           IORING_OFF_CQ_RING);
  if (r.cq_ptr == MAP_FAILED) return nullptr;
  r.sqes_len = p.sq_entries * sizeof(io_uring_sqe);
  void* sqes = mmap(nullptr, r.sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (sqes == MAP_FAILED) return nullptr;
  r.sqes = static_cast<io_uring_sqe*>(sqes);
  auto* sq = static_cast<uint8_t*>(r.sq_ptr);
  auto* cq = static_cast<uint8_t*>(r.cq_ptr);
  r.sq_head = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
  r.sq_tail = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
  r.sq_mask = reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
  r.sq_array = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
  r.sq_entries = p.sq_entries;
  r.cq_head = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
  r.cq_tail = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
  r.cq_mask = reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
  r.cqes = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
  if (!Probe(ring.get())) return nullptr;
  return ring;
}

Uring::~Uring() = default;

bool Uring::ReadAll(const ReadOp* ops, int64_t n, ReadFailure* failure) {
  Rings& r = *r_;
  std::vector<int64_t> done(static_cast<size_t>(n), 0);
  std::vector<int64_t> retry;  // ops whose read came back short or was interrupted
  int64_t next = 0, inflight = 0, finished = 0;
  bool failed = false;
  auto fail = [&](int64_t idx, int err) {
    if (!failed || idx < failure->index) {
      failure->index = idx;
      failure->err = err;
      failure->got = done[idx];
    }
    failed = true;
  };
  // Ops are at most 1 GiB per SQE (the len field is 32 bits); longer ones continue as "short".
  constexpr int64_t kMaxChunk = int64_t{1} << 30;

  while (finished < n) {
    if (failed) {  // stop issuing new work; let what is in flight land
      finished += static_cast<int64_t>(retry.size()) + (n - next);
      retry.clear();
      next = n;
      if (finished >= n && inflight == 0) break;
    }
    unsigned tail = *r.sq_tail;
    const unsigned head = __atomic_load_n(r.sq_head, __ATOMIC_ACQUIRE);
    unsigned to_submit = 0;
    while (inflight < r.sq_entries && tail - head < r.sq_entries && (!retry.empty() || next < n)) {
      int64_t idx;
      if (!retry.empty()) {
        idx = retry.back();
        retry.pop_back();
      } else {
        idx = next++;
        if (ops[idx].want == 0) {
          ++finished;
          continue;
        }
      }
      const ReadOp& op = ops[idx];
      const unsigned slot = tail & *r.sq_mask;
      io_uring_sqe* sqe = &r.sqes[slot];
      std::memset(sqe, 0, sizeof(*sqe));
      sqe->opcode = IORING_OP_READ;
      sqe->fd = op.fd;
      sqe->off = static_cast<uint64_t>(op.offset + done[idx]);
      sqe->addr = reinterpret_cast<uint64_t>(op.dst + done[idx]);
      sqe->len = static_cast<uint32_t>(std::min(op.want - done[idx], kMaxChunk));
      sqe->user_data = static_cast<uint64_t>(idx);
      r.sq_array[slot] = slot;
      ++tail;
      ++to_submit;
      ++inflight;
    }
    __atomic_store_n(r.sq_tail, tail, __ATOMIC_RELEASE);
    if (to_submit == 0 && inflight == 0) break;  // nothing left in flight (all finished or skipped)

    int ret = Enter(r.fd, to_submit, inflight > 0 ? 1u : 0u, IORING_ENTER_GETEVENTS);
    if (ret < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
      // The ring itself is unusable; requests already accepted may still complete, so the engine
      // drops this ring for good after reporting (see Engine::Read).
      fail(next > 0 ? next - 1 : 0, errno);
      return false;
    }
    unsigned chead = *r.cq_head;
    const unsigned ctail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);
    while (chead != ctail) {
      const io_uring_cqe& cqe = r.cqes[chead & *r.cq_mask];
      const int64_t idx = static_cast<int64_t>(cqe.user_data);
      const int res = cqe.res;
      ++chead;
      --inflight;
      const ReadOp& op = ops[idx];
      if (res < 0) {
        if (res == -EAGAIN || res == -EINTR) {
          retry.push_back(idx);
        } else {
          fail(idx, -res);
          ++finished;
        }
      } else if (res == 0) {
        if (done[idx] < op.need) fail(idx, 0);
        ++finished;
      } else {
        done[idx] += res;
        if (done[idx] >= op.want) {
          ++finished;
        } else {
          retry.push_back(idx);
        }
      }
    }
    __atomic_store_n(r.cq_head, chead, __ATOMIC_RELEASE);
  }
  return !failed;
}

#else  // no io_uring header at build time

struct Uring::Rings {};
std::unique_ptr<Uring> Uring::Create(unsigned) { return nullptr; }
Uring::~Uring() = default;
bool Uring::ReadAll(const ReadOp*, int64_t, ReadFailure* failure) {
  failure->index = 0;
  failure->err = ENOSYS;
  return false;
}

#endif

}  // namespace dsjax_io
