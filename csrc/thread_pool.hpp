// fastattn's own thread pool, and a call's stop flag.
//
// The kernels ran on OpenMP's (GNU libgomp's) threads until they had to survive what users do
// to a process: libgomp's pool does not survive fork() (a child's first multi-threaded call hangs
// forever), it ends the process when it cannot create a thread, its idle threads spin for
// ~300,000 iterations unless an environment variable is set before it loads, and nothing in a
// parallel region can stop early. This pool is what PyTorch (c10::ThreadPool), ONNX Runtime and
// ggml do too, with what fastattn needs and nothing more:
//  - fork: a pthread_atfork handler gives the child an empty pool; its first multi-threaded call
//    starts threads of its own, so the child uses all its cores with no setting from the user;
//  - a thread that cannot be created leaves the call to the threads that could (at least the
//    caller's): never an error, never an exit;
//  - idle threads spin for at most kSpinMicros after a call, then sleep on a condition
//    variable: a core they would take from the next call (ours or another library's) is given
//    back within that time, whatever the import order, with no environment variable set;
//  - a long call polls the caller's interrupt check (Ctrl-C) and stops early (stop_requested).
// OpenMP still sets the default thread count (OMP_NUM_THREADS, threadpoolctl's limits), read
// through omp_get_max_threads(), which starts no thread.
#pragma once

#include <cstdint>

namespace fastattn {

// One call's stop flag, and the caller's check for a pending interrupt. The kernels only ask
// stop_requested(); the dispatcher (attention.cpp) owns the object for the length of a call.
struct CallControl {
  // Polled on the calling thread, at most every kPollMillis: nonzero stops the call (the Python
  // binding runs PyErr_CheckSignals() there, so a SIGINT handler that raises stops it).
  int (*poll)(void* ctx) = nullptr;
  void* poll_ctx = nullptr;
  unsigned long caller = 0;   // pthread_self() of the calling thread
  int64_t next_poll_ns = 0;   // CLOCK_MONOTONIC_COARSE
  int stopped = 0;            // read and written with atomic builtins
};

// Time between two polls of a call: a SIGINT is acted on within about this (plus one block of
// work), far inside the ~100 ms a person notices, and a call pays one cheap clock read per block.
constexpr int kPollMillis = 20;

// Whether the call should stop now: an atomic load on any thread; on the calling thread also the
// poll, when kPollMillis have passed since the last one. Null control: never.
bool stop_requested(CallControl* control);

// Starts c's clock: the first poll comes kPollMillis after this.
void start_control(CallControl& c);

// Runs fn(ctx, t) for t = 0 .. threads - 1, t = 0 on the calling thread and the others on pool
// threads, and returns when all have returned; fn must not throw. Where threads cannot be
// created it runs fewer (at least t = 0, on the caller), and returns how many ran: callers hand
// out work dynamically, so every count completes it.
int parallel_run(int threads, void (*fn)(void* ctx, int t), void* ctx);

// The cores this process may run on (its CPU affinity, read once, and again in a forked child),
// at least 1. Calls never run more threads than this: more only adds switching, and a request
// for 40,000 would ask the OS for 40,000 threads.
int available_cores();

}  // namespace fastattn
