// File mappings and the SIGBUS guard (see mapped.h).
#include "mapped.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <mutex>

namespace dsjax_io {

namespace {

uintptr_t PageSize() {
  static const uintptr_t page = [] {
    const long p = sysconf(_SC_PAGESIZE);
    return static_cast<uintptr_t>(p > 0 ? p : 4096);
  }();
  return page;
}

struct Guard {
  sigjmp_buf env;
  uintptr_t lo, hi;  // the pages being read by this thread's current copy
};

// initial-exec: the handler must not call __tls_get_addr (it may allocate, which is not
// async-signal-safe); this model uses the static TLS surplus glibc keeps for dlopen'ed modules.
__thread Guard* t_guard __attribute__((tls_model("initial-exec"))) = nullptr;
// Set while this thread runs the previous handler: a handler that chains back to us (faulthandler
// re-raises with its own predecessor, which may be us) then gets the default action, not a loop.
__thread int t_chaining __attribute__((tls_model("initial-exec"))) = 0;
// The fault address last handed to the previous handler that then returned. If the same address
// faults again on this thread, that handler did not fix the fault (e.g. a disabled faulthandler
// whose function is still our saved predecessor): take the default action instead of looping.
__thread uintptr_t t_chained_fault __attribute__((tls_model("initial-exec"))) = 0;

// The handler that was installed before ours. Never freed: a concurrent signal may be reading it.
std::atomic<const struct sigaction*> g_prev{nullptr};
std::mutex g_install_mu;

void OnSigbus(int sig, siginfo_t* info, void* ctx) {
  Guard* g = t_guard;
  if (g != nullptr && info != nullptr && info->si_code > 0) {  // si_code > 0: raised by a fault
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
    if (addr >= g->lo && addr < g->hi) {
      t_guard = nullptr;
      // SA_NODEFER leaves SIGBUS unblocked when the kernel calls us; a handler installed later
      // without it may have called us with SIGBUS blocked, and sigsetjmp(env, 0) restores no
      // mask: unblock it so that this thread's next fault is delivered.
      sigset_t bus;
      sigemptyset(&bus);
      sigaddset(&bus, SIGBUS);
      pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
      siglongjmp(g->env, 1);
    }
  }
  const bool fault = info != nullptr && info->si_code > 0;
  const uintptr_t fault_addr = fault ? reinterpret_cast<uintptr_t>(info->si_addr) : 0;
  const bool refault = fault && fault_addr != 0 && fault_addr == t_chained_fault;
  t_chained_fault = 0;
  const struct sigaction* prev = (t_chaining || refault) ? nullptr : g_prev.load(std::memory_order_acquire);
  if (prev != nullptr && (prev->sa_flags & SA_SIGINFO) != 0 && prev->sa_sigaction != nullptr) {
    t_chaining = 1;
    prev->sa_sigaction(sig, info, ctx);
    t_chaining = 0;
    t_chained_fault = fault_addr;
    return;
  }
  if (prev != nullptr && prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
    t_chaining = 1;
    prev->sa_handler(sig);
    t_chaining = 0;
    t_chained_fault = fault_addr;
    return;
  }
  const bool sent = info == nullptr || info->si_code <= 0;  // kill()/raise(), not a fault
  if (prev != nullptr && prev->sa_handler == SIG_IGN && sent) return;
  // Default action, as if we had never been installed: a fault re-executes the faulting
  // instruction on return and then dies of SIGBUS; a sent signal is raised again.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
  if (sent) raise(sig);
}

bool IsOurs(const struct sigaction& sa) {
  return (sa.sa_flags & SA_SIGINFO) != 0 && sa.sa_sigaction == &OnSigbus;
}

std::atomic<int64_t> g_live{0};

}  // namespace

int64_t LiveMappings() { return g_live.load(std::memory_order_relaxed); }

int64_t DefaultMaxMappedFiles() {
  static const int64_t cap = [] {
    int64_t limit = 65530;  // the kernel's default vm.max_map_count
    const int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      char buf[32] = {0};
      const ssize_t r = read(fd, buf, sizeof(buf) - 1);
      close(fd);
      if (r > 0) {
        const long long v = std::strtoll(buf, nullptr, 10);
        if (v > 0) limit = static_cast<int64_t>(v);
      }
    }
    return std::max<int64_t>(1, limit / 2);
  }();
  return cap;
}

Mapping::Mapping(int fd) : fd_(fd) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    error_ = errno;
    return;
  }
  if (!S_ISREG(st.st_mode)) {
    error_ = ENODEV;
    return;
  }
  if (st.st_size <= 0) return;  // nothing to map; error_ 0
  void* p = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {  // e.g. a file system without mmap, or vm.max_map_count reached
    error_ = errno;
    return;
  }
  g_live.fetch_add(1, std::memory_order_relaxed);
  // Records are read at random: a fault on an uncached page should read that page, not the
  // 128 KiB read-around window the kernel would otherwise fetch (fault-around of already cached
  // pages is unaffected).
  madvise(p, static_cast<size_t>(st.st_size), MADV_RANDOM);
  data_ = static_cast<const uint8_t*>(p);
  size_ = static_cast<int64_t>(st.st_size);
}

Mapping::~Mapping() {
  if (data_ != nullptr) {
    munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
    g_live.fetch_sub(1, std::memory_order_relaxed);
  }
}

bool EnsureSigbusGuard() {
  struct sigaction cur;
  if (sigaction(SIGBUS, nullptr, &cur) == 0 && IsOurs(cur)) return true;
  std::lock_guard<std::mutex> lock(g_install_mu);
  if (sigaction(SIGBUS, nullptr, &cur) != 0) return false;
  if (IsOurs(cur)) return true;
  g_prev.store(new struct sigaction(cur), std::memory_order_release);  // the old one leaks (tiny)
  struct sigaction ours;
  std::memset(&ours, 0, sizeof(ours));
  ours.sa_sigaction = &OnSigbus;
  ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  return sigaction(SIGBUS, &ours, nullptr) == 0;
}

__attribute__((noinline)) bool GuardedCopy(uint8_t* dst, const uint8_t* src, size_t len) {
  Guard g;
  const uintptr_t page = PageSize();
  g.lo = reinterpret_cast<uintptr_t>(src) & ~(page - 1);
  g.hi = (reinterpret_cast<uintptr_t>(src) + len + page - 1) & ~(page - 1);
  if (sigsetjmp(g.env, 0) != 0) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return false;
  }
  t_guard = &g;
  // The fences keep the compiler from moving the copy out of the guarded window.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, len);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_guard = nullptr;
  return true;
}

__attribute__((noinline)) bool GuardedTouch(const uint8_t* p, size_t len) {
  if (len == 0) return true;
  Guard g;
  const uintptr_t page = PageSize();
  g.lo = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  g.hi = (reinterpret_cast<uintptr_t>(p) + len + page - 1) & ~(page - 1);
  if (sigsetjmp(g.env, 0) != 0) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return false;
  }
  t_guard = &g;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  unsigned sink = 0;
  for (uintptr_t a = g.lo; a < g.hi; a += page) {
    sink += *reinterpret_cast<const volatile uint8_t*>(std::max(a, reinterpret_cast<uintptr_t>(p)));
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_guard = nullptr;
  asm volatile("" : : "r"(sink));
  return true;
}

bool Resident(const uint8_t* p, size_t len) {
  if (len == 0) return true;
  const uintptr_t page = PageSize();
  uintptr_t lo = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t hi = reinterpret_cast<uintptr_t>(p) + len;
  unsigned char vec[64];
  while (lo < hi) {
    const size_t pages = std::min<size_t>(64, (hi - lo + page - 1) / page);
    if (mincore(reinterpret_cast<void*>(lo), pages * page, vec) != 0) return false;
    for (size_t k = 0; k < pages; ++k) {
      if ((vec[k] & 1) == 0) return false;
    }
    lo += pages * page;
  }
  return true;
}

}  // namespace dsjax_io
