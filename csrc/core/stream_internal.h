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

// A writer's copy of a whole payload into shared memory (a payload or a
// slot). From streaming_copy_bytes() up it uses non-temporal stores: the
// destination of a large write is out of cache (a slot written N - 1
// writes ago, or a payload larger than what the caches keep between
// writes), and ordinary stores first read every line they overwrite.
// Measured on the development VM (32 MiB L3, 3 slots of the size, SSE2
// stores): 16 MiB 11 -> 23 GB/s, 8 MiB 19 -> 25 GB/s, 4 MiB 30 -> 28 GB/s
// (memcpy keeps 4 MiB, which stays in cache). The stores are fenced on both
// sides (sfence): after the caller's odd seq or generation, before its
// release store of the even one, as memcpy's ordinary stores are.
void publish_copy(void* dst, const void* src, size_t n);
// TORCH_SHMEM_STREAMING_COPY: the threshold in bytes (default 8 MiB; 0:
// never), read once per process. An invalid value makes create and open
// throw kValue (check_streaming_copy_setting), so no write starts with it.
size_t streaming_copy_bytes();
void check_streaming_copy_setting(const std::string& name);

constexpr size_t kGeometryBytes = offsetof(Header, seq);  // immutable part of the header


timespec to_timespec(double seconds);
// FUTEX_WAIT on a process-shared word for at most `seconds`: 0 or errno.
int futex_wait(const std::atomic<uint32_t>* addr, uint32_t expected, double seconds);
void futex_wake(const std::atomic<uint32_t>* addr);

// The lock (lock.cpp): initializes a mutex of the stream lock's kind.
int init_stream_mutex(pthread_mutex_t* m);

}  // namespace core
}  // namespace torch_shmem
