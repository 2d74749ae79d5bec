// The stream lock: a robust, process-shared, error-checking pthread mutex in
// the segment's lock line, re-entrant per thread through the header's owner
// fields. See the state machine below and docs/design.md.
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <string>

#include "stream_internal.h"

namespace torch_shmem {
namespace core {

// The lock is a glibc robust, process-shared, error-checking mutex.
int init_stream_mutex(pthread_mutex_t* m) {
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
  int rc = pthread_mutex_init(m, &attr);
  pthread_mutexattr_destroy(&attr);
  return rc;
}

// The glibc `__kind` of a mutex initialized like the stream's lock. A
// damaged header can hold any kind, and glibc trusts it: a priority-protect
// kind ends in an assertion (SIGABRT) inside pthread_mutex_lock, a
// non-robust one is never released by unlock() (the futex word then holds
// 1, not the owner's tid). Comparing the kind before every lock operation
// turns all of these into a ValueError. glibc only, like the re-entrancy
// test (design.md).
namespace {

int reference_lock_kind() {
  static const int kind = [] {
    pthread_mutex_t m;
    init_stream_mutex(&m);
    int k = m.__data.__kind;
    pthread_mutex_destroy(&m);
    return k;
  }();
  return kind;
}


}  // namespace

void Stream::check_lock_kind() const {
  int kind = __atomic_load_n(&hdr_->mutex.__data.__kind, __ATOMIC_RELAXED);
  if (kind != reference_lock_kind())
    throw Error(ErrorKind::kValue, "stream '" + name_ + "': its lock is corrupted (mutex kind " +
                                       std::to_string(kind) + ", expected " +
                                       std::to_string(reference_lock_kind()) +
                                       "); remove the stream and create it again");
}

// ---------------------------------------------------------------------------
// Lock
//
// State machine of the shared mutex (robust, process-shared):
//   FREE --lock--> HELD(pid,tid) --unlock--> FREE
//   HELD --owner thread/process dies--> OWNER_DIED (kernel, robust list)
//   OWNER_DIED --next lock returns EOWNERDEAD--> HELD(new owner), after
//     pthread_mutex_consistent and, if the dead owner left seq odd, the
//     stream is marked broken (the payload is torn; readers raise
//     InconsistentStreamError until the next completed write).
// The kernel clears the dead owner's tid from the futex word itself, so a
// recycled pid/tid can never look like the owner.
// ---------------------------------------------------------------------------

// The futex word of a glibc robust mutex holds the owner's tid (the kernel
// reads it to mark OWNER_DIED when that thread dies, clearing the tid).
// Reading it is the authoritative "does this thread hold the lock" test;
// owner_pid guards against equal tids in another pid namespace.
bool Stream::held_by_this_thread() const {
  const int* word = reinterpret_cast<const int*>(&hdr_->mutex);
  int v = __atomic_load_n(word, __ATOMIC_ACQUIRE);
  return (v & FUTEX_TID_MASK) == this_tid() &&
         hdr_->owner_pid.load(std::memory_order_relaxed) == this_pid();
}

int Stream::held_depth() const {
  return held_by_this_thread() ? hdr_->owner_depth.load(std::memory_order_relaxed) : 0;
}

bool Stream::lock_for(double seconds) {
  if (held_by_this_thread()) {
    hdr_->owner_depth.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  check_lock_kind();
  int rc = pthread_mutex_trylock(&hdr_->mutex);
  if (rc == EBUSY && seconds > 0) {
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    timespec add = to_timespec(seconds);
    timespec abs{now.tv_sec + add.tv_sec, now.tv_nsec + add.tv_nsec};
    if (abs.tv_nsec >= 1000000000L) {
      abs.tv_sec += 1;
      abs.tv_nsec -= 1000000000L;
    }
    rc = pthread_mutex_clocklock(&hdr_->mutex, CLOCK_MONOTONIC, &abs);
  }
  if (rc == EBUSY || rc == ETIMEDOUT) return false;
  if (rc == EOWNERDEAD) {
    // The previous owner died holding the lock (possibly mid-write; see
    // below).
    pthread_mutex_consistent(&hdr_->mutex);
    recovered_ = true;
    rc = 0;
  }
  if (rc == ENOTRECOVERABLE)
    throw Error(ErrorKind::kState, "the lock of stream '" + name_ + "' is not recoverable");
  if (rc != 0) throw_os("lock of stream '" + name_ + "'", rc);
  // A fresh holder that finds seq odd knows that no write is in progress
  // (writers hold the lock for the whole odd window), so the payload is
  // torn: its writer died mid-write (EOWNERDEAD above), released the lock
  // mid-write, or the header was damaged. In all three cases it is marked
  // broken, so that readers raise InconsistentStreamError until the next
  // write.
  if (hdr_->seq.load(std::memory_order_relaxed) & 1)
    hdr_->broken.store(1, std::memory_order_release);
  hdr_->owner_pid.store(this_pid(), std::memory_order_relaxed);
  hdr_->owner_tid.store(this_tid(), std::memory_order_relaxed);
  hdr_->owner_depth.store(1, std::memory_order_relaxed);
  return true;
}

void Stream::unlock() {
  if (!held_by_this_thread())
    throw Error(ErrorKind::kState,
                "cannot release the lock of stream '" + name_ +
                    "': this thread does not hold it (the lock is unlocked for this thread; "
                    "each release() must match an acquire())");
  if (hdr_->owner_depth.fetch_sub(1, std::memory_order_relaxed) > 1) return;
  check_lock_kind();  // glibc would assert on a damaged kind
  hdr_->owner_pid.store(0, std::memory_order_relaxed);
  hdr_->owner_tid.store(0, std::memory_order_relaxed);
  pthread_mutex_unlock(&hdr_->mutex);
}

}  // namespace core
}  // namespace torch_shmem
