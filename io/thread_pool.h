// A small persistent thread pool for batched I/O: Run(n, body) calls body(i) for every i in [0, n)
// on the pool's threads and the calling thread, and returns when all calls finished. Items are
// claimed one at a time from an atomic counter, so a slow read (cold page, network file system)
// does not hold up the others: this is what keeps many preads in flight.
//
// Start failure: when a thread cannot be created (EAGAIN: RLIMIT_NPROC, cgroup pids.max, or no
// address space left for its stack) the constructor stops and joins the threads it did start and
// records the error in start_error(); it never throws (a std::vector of joinable std::threads
// unwinding would call std::terminate). The owner decides what to do (Engine reports it).
//
// Fork: a child process inherits the pool object but none of its threads. There Run() does all the
// work on the calling thread, and the destructor leaks the thread handles instead of joining
// threads that do not exist (joining them would hang or crash the child).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#include <unistd.h>

namespace dsjax_io {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) noexcept : owner_pid_(getpid()), s_(new (std::nothrow) Shared()) {
    if (s_ == nullptr) {
      start_error_ = ENOMEM;
      return;
    }
    try {
      threads_.reserve(static_cast<size_t>(std::max(0, num_threads)));
      for (int t = 0; t < num_threads; ++t) threads_.emplace_back([this, t] { Worker(t); });
    } catch (const std::system_error& e) {
      start_error_ = e.code().value() != 0 ? e.code().value() : EAGAIN;
    } catch (...) {  // std::bad_alloc from the vector or the thread's state
      start_error_ = ENOMEM;
    }
    if (start_error_ != 0) StopAndJoin();  // the pool is then empty: Run works on the caller alone
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    if (Forked()) {
      // Deliberately leaked: the condition variables still count the parent's waiting workers
      // (destroying them would wait forever) and the threads cannot be joined.
      new (std::nothrow) std::vector<std::thread>(std::move(threads_));
      return;
    }
    if (s_ == nullptr) return;
    StopAndJoin();
    delete s_;
  }

  int size() const { return static_cast<int>(threads_.size()); }

  // 0, or the errno of the thread creation that failed in the constructor (the pool is empty then).
  int start_error() const { return start_error_; }

  // Runs body(i) for i in [0, n) using at most `helpers` pool threads plus the caller. Concurrent
  // Run calls are serialised: each batch gets the whole pool. body must not throw.
  void Run(int64_t n, int helpers, const std::function<void(int64_t)>& body) {
    if (n <= 0) return;
    if (Forked() || s_ == nullptr) {  // no workers here, and the locks may have been held at fork time
      for (int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    Shared& s = *s_;
    std::lock_guard<std::mutex> run_lock(s.run_mu);
    helpers = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>({helpers, size(), n - 1})));
    if (helpers == 0) {
      for (int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.body = &body;
      s.n = n;
      s.next.store(0, std::memory_order_relaxed);
      s.slots = helpers;
      ++s.generation;
    }
    // Wake only as many workers as there are slots (no thundering herd on a busy machine).
    for (int h = 0; h < helpers; ++h) s.cv.notify_one();
    Drain();
    std::unique_lock<std::mutex> lock(s.mu);
    s.slots = 0;  // all items are claimed: workers that have not woken yet need not come
    s.done_cv.wait(lock, [&s] { return s.active == 0; });
    s.body = nullptr;
  }

 private:
  struct Shared {
    std::mutex run_mu;  // one batch at a time
    std::mutex mu;
    std::condition_variable cv, done_cv;
    bool stop = false;
    uint64_t generation = 0;
    int slots = 0;   // workers still wanted for the current batch
    int active = 0;  // workers inside Drain()
    const std::function<void(int64_t)>* body = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
  };

  bool Forked() const { return getpid() != owner_pid_; }

  void StopAndJoin() noexcept {
    {
      std::lock_guard<std::mutex> lock(s_->mu);
      s_->stop = true;
    }
    s_->cv.notify_all();
    for (auto& th : threads_) th.join();
    threads_.clear();
  }

  void Drain() {
    Shared& s = *s_;
    for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed); i < s.n;
         i = s.next.fetch_add(1, std::memory_order_relaxed)) {
      (*s.body)(i);
    }
  }

  void Worker(int /*id*/) {
    Shared& s = *s_;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(s.mu);
        s.cv.wait(lock, [&] { return s.stop || (s.generation != seen && s.slots > 0); });
        if (s.stop) return;
        seen = s.generation;
        --s.slots;
        ++s.active;
      }
      Drain();
      std::lock_guard<std::mutex> lock(s.mu);
      if (--s.active == 0) s.done_cv.notify_one();
    }
  }

  const pid_t owner_pid_;
  int start_error_ = 0;
  Shared* s_;  // owned; leaked in a forked child (see the destructor)
  std::vector<std::thread> threads_;
};

}  // namespace dsjax_io
