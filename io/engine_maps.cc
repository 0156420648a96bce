// The mmap engine's set of file mappings (see engine.h): registration, the cap on mapped files
// with least-recently-used eviction, mapping evicted files again on demand, visible mmap failures,
// and the background thread that populates the page tables of new mappings.
//
// Why a cap: every mapping is a VMA, and vm.max_map_count (65530 by default) bounds all of a
// process's VMAs together: a data set of tens of thousands of files mapped whole would leave no
// room for malloc arenas, thread stacks or XLA's buffers, and their allocations would then fail
// far from here. Mappings also take address space (RLIMIT_AS, or 128 TiB). So at most max_maps
// files are mapped (default: half of vm.max_map_count, for this engine and for all engines of the
// process together), and mmap's ENOMEM is answered by unmapping the least recently used ones and
// trying once more.
//
// Lock protocol: a batch holds maps_mu_ shared from its first lookup to its last copy (and the
// population thread for each 2 MiB step), so a mapping is only unmapped (UnmapFile, eviction) with
// maps_mu_ held exclusively, when no thread can be inside it: the SIGBUS guard is never needed for
// an unmapped range. Each mapped batch takes a tick of clock_ and stamps it on the mappings it
// uses (relaxed atomics, under the shared lock); eviction, under the exclusive lock, unmaps the
// smallest stamps first and never one stamped by the batch that asks for room or a newer one, so
// a batch does not evict its own files (racing batches may; every batch re-checks its mappings
// after mapping, under the shared lock, so that costs speed, never correctness). A batch whose files were evicted drops its shared lock, maps them under
// the exclusive lock and starts over once; records of files that still have no mapping (more
// distinct files in one batch than the cap allows, or mmap failed) are read with pread and counted
// in Stats::unmapped. With a working set larger than the cap, files are unmapped and mapped again
// often (Stats::evicted/remapped say so); raise max_mapped_files or vm.max_map_count then.
#include <errno.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "engine.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14 uapi value; older kernels answer EINVAL (then: touch)
#endif

namespace dsjax_io {

bool Engine::MapFile(int fd, const std::string& path) {
  // A forked child never touches the mappings' lock (see Read); it reads by pread.
  if (!mmap_ || fd < 0 || getpid() != owner_pid_) return false;
  try {
    std::unique_lock<std::shared_mutex> lock(maps_mu_);
    if (slots_.size() <= static_cast<size_t>(fd)) slots_.resize(static_cast<size_t>(fd) + 1);
    Drop(fd);  // a stale slot of a descriptor number closed without UnmapFile
    Slot& s = slots_[static_cast<size_t>(fd)];
    s.registered = true;
    s.path = path;
    // At the cap, a new file waits for its first read to be mapped (evicting then): opening a data
    // set of more files than the cap must not map and unmap all but the last ones in turn.
    if (n_live_.load() >= max_maps_ || LiveMappings() >= DefaultMaxMappedFiles()) return false;
    return MapSlot(fd, /*keep=*/UINT64_MAX);  // no batch to protect: any mapping may go
  } catch (...) {  // std::bad_alloc: the file is read with pread, like any mapping failure
    n_map_failed_.fetch_add(1);
    return false;
  }
}

void Engine::UnmapFile(int fd) {
  if (getpid() != owner_pid_) return;  // a forked child: see MapFile; ~Engine frees the mappings
  std::unique_lock<std::shared_mutex> lock(maps_mu_);
  Drop(fd);
}

void Engine::Drop(int fd) {
  if (fd < 0 || static_cast<size_t>(fd) >= slots_.size()) return;
  Slot& s = slots_[static_cast<size_t>(fd)];
  if (s.map != nullptr) {
    delete s.map;
    n_live_.fetch_sub(1);
  }
  s.map = nullptr;
  s.registered = false;
  s.failed = false;
  s.path.clear();
}

int64_t Engine::EvictLru(int64_t count, int64_t bytes, uint64_t keep) {
  std::vector<std::pair<uint64_t, int>> lru;  // (last use, fd) of what may go
  for (size_t fd = 0; fd < slots_.size(); ++fd) {
    const Mapping* m = slots_[fd].map;
    if (m != nullptr && m->last_use.load(std::memory_order_relaxed) < keep) {
      lru.emplace_back(m->last_use.load(std::memory_order_relaxed), static_cast<int>(fd));
    }
  }
  if (bytes <= 0 && count < static_cast<int64_t>(lru.size())) {
    // Only the `count` oldest are needed, in any order: O(files), not a sort of them all.
    std::nth_element(lru.begin(), lru.begin() + count, lru.end());
    lru.resize(static_cast<size_t>(count));
  } else {
    std::sort(lru.begin(), lru.end());
  }
  int64_t evicted = 0, freed = 0;
  for (const auto& [use, fd] : lru) {
    if (evicted >= count && freed >= bytes) break;
    Slot& s = slots_[static_cast<size_t>(fd)];
    freed += s.map->size();
    delete s.map;  // munmap: no batch is inside it (exclusive lock)
    s.map = nullptr;
    n_live_.fetch_sub(1);
    ++evicted;
  }
  n_evicted_.fetch_add(evicted);
  return evicted;
}

bool Engine::MapSlot(int fd, uint64_t keep) {
  Slot& s = slots_[static_cast<size_t>(fd)];
  const int64_t over = std::max(n_live_.load() + 1 - max_maps_, LiveMappings() + 1 - DefaultMaxMappedFiles());
  if (over > 0 && EvictLru(over, 0, keep) < over) return false;  // refused: all in use by this batch
  std::unique_ptr<Mapping> m(new (std::nothrow) Mapping(fd));
  int err = m ? m->error() : ENOMEM;
  // ENOMEM: vm.max_map_count or the address space (RLIMIT_AS) is exhausted; unmapping our least
  // recently used files (at least this file's size) may make room. Twice at most.
  for (int round = 0; round < 2 && m && m->data() == nullptr && err == ENOMEM; ++round) {
    struct stat st;
    const int64_t want = fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
    if (EvictLru(1, want, keep) == 0) break;
    m.reset(new (std::nothrow) Mapping(fd));
    err = m ? m->error() : ENOMEM;
  }
  if (!m || m->data() == nullptr) {
    if (m && err == 0) return false;  // an empty file: nothing to map, nothing lost
    s.failed = true;
    n_map_failed_.fetch_add(1);
    std::lock_guard<std::mutex> lock(report_mu_);
    if (!reported_) {
      reported_ = true;
      report_pending_.store(true);
      report_path_ = s.path;
      report_err_ = err;
    }
    return false;
  }
  m->last_use.store(keep != UINT64_MAX ? keep : clock_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  const Mapping* job = m.get();
  s.map = m.release();
  n_live_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(pop_->mu);
    pop_->queue.emplace_back(fd, job);  // may throw std::bad_alloc: the mapping is in place by now
  }
  pop_->cv.notify_one();
  return true;
}

void Engine::MapMissing(std::vector<int>* fds, uint64_t tick) {
  std::sort(fds->begin(), fds->end());
  fds->erase(std::unique(fds->begin(), fds->end()), fds->end());
  try {
    std::unique_lock<std::shared_mutex> lock(maps_mu_);
    // Room for all of them in one pass over the slots (not one per file: with a working set
    // larger than the cap, most batches come here with many files).
    int64_t want = 0;
    for (int fd : *fds) {
      if (static_cast<size_t>(fd) >= slots_.size()) continue;
      const Slot& s = slots_[static_cast<size_t>(fd)];
      want += s.registered && !s.failed && s.map == nullptr;
    }
    const int64_t over = std::max(n_live_.load() + want - max_maps_, LiveMappings() + want - DefaultMaxMappedFiles());
    if (over > 0) EvictLru(over, 0, tick);
    for (int fd : *fds) {
      if (static_cast<size_t>(fd) >= slots_.size()) continue;
      const Slot& s = slots_[static_cast<size_t>(fd)];
      if (!s.registered || s.failed || s.map != nullptr) continue;  // changed since the batch looked
      if (MapSlot(fd, tick)) n_remapped_.fetch_add(1);
    }
  } catch (...) {  // std::bad_alloc: what is not mapped is read with pread
  }
}

bool Engine::TakeMapFailure(std::string* path, int* err) {
  // A forked child leaves the parent's failures to the parent (report_mu_ may have been held by
  // one of the parent's threads at fork time).
  if (!report_pending_.load(std::memory_order_relaxed) || getpid() != owner_pid_) return false;
  std::lock_guard<std::mutex> lock(report_mu_);
  if (!report_pending_.load()) return false;
  report_pending_.store(false);
  *path = report_path_;
  *err = report_err_;
  return true;
}

bool Engine::HoldMapsLockForTest(double seconds) {
  if (getpid() != owner_pid_) return false;
  if (lock_holder_.joinable()) lock_holder_.join();
  auto state = std::make_shared<std::pair<std::mutex, std::condition_variable>>();
  auto held = std::make_shared<bool>(false);
  try {
    lock_holder_ = std::thread([this, seconds, state, held] {
      std::unique_lock<std::shared_mutex> lock(maps_mu_);
      {
        std::lock_guard<std::mutex> l(state->first);
        *held = true;
      }
      state->second.notify_all();
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    });
  } catch (const std::system_error&) {
    return false;
  }
  std::unique_lock<std::mutex> l(state->first);
  state->second.wait(l, [&] { return *held; });
  return true;
}

void Engine::PopulateLoop() {
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);  // only spare CPU time
  for (;;) {
    std::pair<int, const Mapping*> job;
    {
      std::unique_lock<std::mutex> lock(pop_->mu);
      pop_->cv.wait(lock, [this] { return pop_->stop.load() || !pop_->queue.empty(); });
      if (pop_->stop.load()) return;
      job = pop_->queue.front();
      pop_->queue.pop_front();
    }
    Populate(job.first, job.second);
  }
}

void Engine::Populate(int fd, const Mapping* job) {
  const long page_l = sysconf(_SC_PAGESIZE);
  const size_t page = static_cast<size_t>(page_l > 0 ? page_l : 4096);
  constexpr size_t kStepPages = 512;
  unsigned char vec[kStepPages];
  for (size_t off = 0;; off += kStepPages * page) {
    if (pop_->stop.load(std::memory_order_relaxed)) return;
    std::shared_lock<std::shared_mutex> lock(maps_mu_);
    // job may have been unmapped (and its address reused by a newer mapping of the same fd: then
    // that one is populated, which is as good). Never dereferenced unless it is fd's mapping now.
    const Mapping* m = static_cast<size_t>(fd) < slots_.size() ? slots_[static_cast<size_t>(fd)].map : nullptr;
    if (m != job || off >= static_cast<size_t>(m->size())) return;  // unmapped, replaced or done
    const uint8_t* base = m->data() + off;
    const size_t len = std::min(kStepPages * page, static_cast<size_t>(m->size()) - off);
    const size_t pages = (len + page - 1) / page;
    if (mincore(const_cast<uint8_t*>(base), len, vec) != 0) return;
    for (size_t k = 0; k < pages;) {
      if ((vec[k] & 1) == 0) {
        ++k;
        continue;
      }
      size_t j = k;
      while (j < pages && (vec[j] & 1) != 0) ++j;
      // Only resident runs: populating must never read from the device.
      uint8_t* run = const_cast<uint8_t*>(base) + k * page;
      const size_t run_len = std::min(j * page, len) - k * page;
      if (!populate_touch_.load(std::memory_order_relaxed)) {
        if (madvise(run, run_len, MADV_POPULATE_READ) == 0) {
          n_populated_.fetch_add(static_cast<int64_t>(j - k), std::memory_order_relaxed);
          k = j;
          continue;
        }
        if (errno == EFAULT) return;  // the file shrank under the mapping: stop this file
        if (errno != EINVAL) {        // EINTR/EAGAIN/ENOMEM: skip this run, pages fault in on use
          k = j;
          continue;
        }
        populate_touch_.store(true);  // EINVAL: a kernel without MADV_POPULATE_READ (< 5.14)
      }
      if (!EnsureSigbusGuard() || !GuardedTouch(run, run_len)) return;  // SIGBUS: the file shrank
      n_populated_.fetch_add(static_cast<int64_t>(j - k), std::memory_order_relaxed);
      k = j;
    }
  }
}

}  // namespace dsjax_io
