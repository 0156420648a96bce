// ParallelFor over XLA's intra-op CPU thread pool.
//
// The calling thread takes chunks too, and a helper task that starts late finds no chunk left and
// returns at once, so the handler never waits on a task that has not started: no deadlock when the
// pool is busy or when the handler itself runs on a pool thread. The shared state is reference
// counted because late helpers may run after the handler has returned.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace dsjax {

namespace internal {
struct ParallelState {
  std::function<void(int64_t, int64_t)> body;
  int64_t n = 0, chunk = 1, num_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  // Runs chunks until none are left; returns after finishing the ones it took.
  void Drain() {
    for (;;) {
      int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      int64_t begin = c * chunk, end = std::min(n, begin + chunk);
      body(begin, end);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};
}  // namespace internal

// Calls body(begin, end) over [0, n) in chunks of at least `min_chunk` items, spread over the pool.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t min_chunk,
                        std::function<void(int64_t, int64_t)> body) {
  if (n <= 0) return;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  min_chunk = std::max<int64_t>(1, min_chunk);
  // About 4 chunks per thread balances uneven rows without much scheduling overhead.
  int64_t chunk = std::max(min_chunk, (n + 4 * threads - 1) / (4 * threads));
  int64_t num_chunks = (n + chunk - 1) / chunk;
  if (threads == 1 || num_chunks == 1) {
    body(0, n);
    return;
  }
  auto state = std::make_shared<internal::ParallelState>();
  state->body = std::move(body);
  state->n = n;
  state->chunk = chunk;
  state->num_chunks = num_chunks;
  int64_t helpers = std::min(threads, num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state] { state->Drain(); });
  }
  state->Drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load(std::memory_order_acquire) == num_chunks; });
}

}  // namespace dsjax
