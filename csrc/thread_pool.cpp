// fastattn's thread pool (see thread_pool.hpp for why it exists and what it promises).
//
// A pool is a set of worker threads that one caller at a time drives. Concurrent callers (Python
// threads calling fastattn at once) each take a pool of their own from a free list, as libgomp
// gives each calling thread its own team; an idle pool's workers sleep.
//
// A run publishes (generation, participants) in one atomic word, so a worker that missed a run
// (it was not needed) can never act on a later run's function with an earlier run's count.
#include "thread_pool.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#include <time.h>
#define FASTATTN_POSIX 1
#endif
#if defined(__linux__)
#include <sched.h>
#endif

namespace fastattn {

namespace {

// How long an idle thread, and a caller waiting for its workers, spin before they sleep. Long
// enough to cover the gap between back-to-back calls from Python (a few microseconds) and the
// workers' uneven finish, so a stream of calls pays no wake-up (a futex wake and a reschedule,
// 10-50 us on a VM); short enough that an idle thread gives its core back at once: libgomp's
// default spin (300,000 iterations, milliseconds) took a core from the next call of another
// library on a busy machine.
constexpr int kSpinMicros = 50;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spins until pred() or kSpinMicros have passed; true when pred() held.
template <class Pred>
bool spin_until(Pred pred) {
  const int64_t until = monotonic_ns() + int64_t(kSpinMicros) * 1000;
  for (int n = 1;; ++n) {
    if (pred()) return true;
    cpu_relax();
    if (n % 64 == 0 && monotonic_ns() > until) return pred();
  }
}

constexpr int kCountBits = 16;  // participants of a run, in the low bits of the state word
constexpr uint64_t kCountMask = (uint64_t(1) << kCountBits) - 1;

struct Pool {
  std::mutex mu;
  std::condition_variable work_cv, done_cv;
  std::atomic<uint64_t> state{0};  // (generation << kCountBits) | threads of the current run
  std::atomic<int> pending{0};     // workers of the current run still running
  std::atomic<int> sleepers{0};    // workers waiting on work_cv
  std::atomic<bool> caller_sleeping{false};
  void (*fn)(void*, int) = nullptr;  // the current run's; written before state is published
  void* ctx = nullptr;
  int workers = 0;  // worker threads started (indices 1 .. workers); only the owner changes it
};

void worker_main(Pool* p, int index, uint64_t seen) {
  for (;;) {
    uint64_t s;
    if (!spin_until([&] { return (s = p->state.load(std::memory_order_acquire)) != seen; })) {
      std::unique_lock<std::mutex> lock(p->mu);
      p->sleepers.fetch_add(1);
      while ((s = p->state.load()) == seen) p->work_cv.wait(lock);
      p->sleepers.fetch_sub(1);
    }
    seen = s;
    if (uint64_t(index) >= (s & kCountMask)) continue;  // not needed for this run
    p->fn(p->ctx, index);
    // The last worker wakes the caller if it went to sleep (seq_cst on both sides: either the
    // worker sees caller_sleeping, or the caller sees pending == 0 before it waits).
    if (p->pending.fetch_sub(1) == 1 && p->caller_sleeping.load()) {
      std::lock_guard<std::mutex> lock(p->mu);
      p->done_cv.notify_one();
    }
  }
}

// Starts workers until the pool has `want` (or the OS refuses one). Workers start with every
// signal blocked: a signal meant for the process (Ctrl-C) is then delivered to a thread of the
// program (Python's main thread), never to a pool thread.
void grow(Pool* p, int want) {
  if (p->workers >= want) return;
#ifdef FASTATTN_POSIX
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
#endif
  const uint64_t seen = p->state.load();
  while (p->workers < want) {
    try {
      std::thread(worker_main, p, p->workers + 1, seen).detach();
    } catch (const std::system_error&) {  // EAGAIN: no more threads (ulimit, memory, pids)
      break;
    } catch (const std::bad_alloc&) {
      break;
    }
    ++p->workers;
  }
#ifdef FASTATTN_POSIX
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
#endif
}

// Idle pools, one taken per concurrent caller. Never destroyed: pool threads may still be
// sleeping at exit, and a forked child leaves its parent's pools behind (see on_fork_child).
struct Registry {
  std::mutex mu;
  std::vector<Pool*> idle;
};

std::atomic<Registry*> g_registry{nullptr};
std::atomic<int> g_cores{0};

int count_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? int(n) : 1;
}

#ifdef FASTATTN_POSIX
// In the child of fork() only the forking thread exists: the parent's pool threads are gone, and
// a pool or registry lock may have been held by one of them. The child starts afresh (the old
// objects are left alone, a few hundred bytes) and counts its cores again.
void on_fork_child() {
  g_registry.store(new Registry());
  g_cores.store(count_cores());
}
#endif

Registry* registry() {
  Registry* r = g_registry.load(std::memory_order_acquire);
  if (r) return r;
  static std::once_flag once;
  std::call_once(once, [] {
#ifdef FASTATTN_POSIX
    pthread_atfork(nullptr, nullptr, on_fork_child);
#endif
    Registry* fresh = new Registry();
    Registry* expected = nullptr;
    if (!g_registry.compare_exchange_strong(expected, fresh)) delete fresh;
  });
  return g_registry.load(std::memory_order_acquire);
}

Pool* acquire_pool() {
  Registry* r = registry();
  {
    std::lock_guard<std::mutex> lock(r->mu);
    if (!r->idle.empty()) {
      Pool* p = r->idle.back();
      r->idle.pop_back();
      return p;
    }
  }
  return new (std::nothrow) Pool();
}

void release_pool(Pool* p) {
  Registry* r = registry();
  std::lock_guard<std::mutex> lock(r->mu);
  try {
    r->idle.push_back(p);
  } catch (const std::bad_alloc&) {  // the pool is lost, its threads sleep on: harmless
  }
}

int64_t coarse_ns() {
#if defined(CLOCK_MONOTONIC_COARSE)
  // A few nanoseconds (a vDSO read, no system call) at the tick's resolution (1-4 ms), which is
  // plenty for a 20 ms poll interval: read once per block of work on the calling thread.
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
#else
  return monotonic_ns();
#endif
}

unsigned long this_thread_id() {
#ifdef FASTATTN_POSIX
  return (unsigned long)pthread_self();
#else
  return 1;
#endif
}

}  // namespace

int available_cores() {
  int n = g_cores.load(std::memory_order_relaxed);
  if (n == 0) {
    registry();  // registers the fork handler, which keeps the count right in a child
    n = count_cores();
    g_cores.store(n, std::memory_order_relaxed);
  }
  return n;
}

int parallel_run(int threads, void (*fn)(void*, int), void* ctx) {
  if (threads > int(kCountMask)) threads = int(kCountMask);
  Pool* p = threads > 1 ? acquire_pool() : nullptr;
  if (p) grow(p, threads - 1);
  int n = 1;
  if (p) n = p->workers + 1 < threads ? p->workers + 1 : threads;
  if (n <= 1) {
    if (p) release_pool(p);
    fn(ctx, 0);
    return 1;
  }
  p->fn = fn;
  p->ctx = ctx;
  p->pending.store(n - 1);
  const uint64_t generation = (p->state.load() >> kCountBits) + 1;
  p->state.store((generation << kCountBits) | uint64_t(n));
  if (p->sleepers.load() > 0) {
    std::lock_guard<std::mutex> lock(p->mu);
    p->work_cv.notify_all();
  }
  fn(ctx, 0);
  if (!spin_until([&] { return p->pending.load(std::memory_order_acquire) == 0; })) {
    std::unique_lock<std::mutex> lock(p->mu);
    p->caller_sleeping.store(true);
    while (p->pending.load() != 0) p->done_cv.wait(lock);
    p->caller_sleeping.store(false);
  }
  release_pool(p);
  return n;
}

void start_control(CallControl& c) {
  c.caller = this_thread_id();
  c.next_poll_ns = coarse_ns() + int64_t(kPollMillis) * 1000000;
  c.stopped = 0;
}

bool stop_requested(CallControl* c) {
  if (!c) return false;
  if (__atomic_load_n(&c->stopped, __ATOMIC_RELAXED)) return true;
  if (!c->poll || this_thread_id() != c->caller) return false;
  const int64_t now = coarse_ns();
  if (now < c->next_poll_ns) return false;
  c->next_poll_ns = now + int64_t(kPollMillis) * 1000000;
  if (c->poll(c->poll_ctx) == 0) return false;
  __atomic_store_n(&c->stopped, 1, __ATOMIC_RELAXED);
  return true;
}

}  // namespace fastattn
