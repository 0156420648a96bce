// A minimal io_uring reader over the raw syscalls (<linux/io_uring.h>; liburing is not needed).
// One ring per engine; a batch of reads is pushed into the submission queue, submitted with one
// io_uring_enter, and completions are reaped until every read is complete. Short reads are
// resubmitted for the remainder. Whether io_uring works is decided at run time (seccomp and
// io_uring_disabled often forbid it in containers); Create() returns nullptr when it does not.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dsjax_io {

// One read: `want` bytes from fd at `offset` into dst. Reaching end of file after `need` bytes is
// fine (O_DIRECT reads round the length up past the end of the file); before is an error.
struct ReadOp {
  int fd;
  int64_t offset;
  int64_t want;
  int64_t need;
  uint8_t* dst;
};

// The first failure of a batch: which op, errno (0 for end of file before `need`), bytes read.
struct ReadFailure {
  int64_t index = -1;
  int err = 0;
  int64_t got = 0;
};

class Uring {
 public:
  // nullptr when io_uring is unavailable here (no header at build time, ENOSYS, EPERM, ...).
  static std::unique_ptr<Uring> Create(unsigned entries);
  ~Uring();
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  // Reads every op; returns false and fills *failure on the first error (the other ops still
  // finish first, so no request is left in flight touching the caller's buffers).
  bool ReadAll(const ReadOp* ops, int64_t n, ReadFailure* failure);

 private:
  Uring() = default;
  struct Rings;
  std::unique_ptr<Rings> r_;
};

}  // namespace dsjax_io
