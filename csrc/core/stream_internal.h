// Internal to csrc/core: what the segment (stream.cpp), the lock
// (lock.cpp) and the seqlock (seqlock.cpp) share.
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "stream.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TSHM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define TSHM_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define TSHM_CPU_RELAX() ((void)0)
#endif

namespace torch_shmem {
namespace core {

// Cached pid and fork generation (stream.cpp); see this_tid().
extern pid_t g_pid;
extern std::atomic<int> g_fork_generation;

inline pid_t this_pid() { return g_pid; }

inline pid_t this_tid() {
  static thread_local pid_t tid = 0;
  static thread_local int generation = -1;
  int gen = g_fork_generation.load(std::memory_order_relaxed);
  if (generation != gen) {
    tid = static_cast<pid_t>(syscall(SYS_gettid));
    generation = gen;
  }
  return tid;
}

// Copies with the widest loads available; memcpy is already optimal for
// the sizes that matter, the wrapper only documents that the source may be
// concurrently modified (seqlock reader), which is why the result is
// validated by re-reading seq afterwards.
inline void racy_copy(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }

constexpr size_t kGeometryBytes = offsetof(Header, seq);  // immutable part of the header


timespec to_timespec(double seconds);
// FUTEX_WAIT on a process-shared word for at most `seconds`: 0 or errno.
int futex_wait(const std::atomic<uint32_t>* addr, uint32_t expected, double seconds);
void futex_wake(const std::atomic<uint32_t>* addr);

// The lock (lock.cpp): initializes a mutex of the stream lock's kind.
int init_stream_mutex(pthread_mutex_t* m);

}  // namespace core
}  // namespace torch_shmem
