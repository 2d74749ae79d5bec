// Session: what a binding does with one mapped stream, written once for
// both bindings (csrc/python: NumPy, csrc/ops: torch.ops.shmem).
//
//   * Payload: where a stream's publications live (the CPU payload of the
//     segment, or the slots of a slotted stream, slots.h) behind one set of
//     write/read calls, so that no binding branches on the kind of stream.
//   * Blocking: taking the lock and waiting for a publication, in bounded
//     slices up to a Deadline. Between two slices the session calls the
//     binding's Interrupt hook, which decides whether the call goes on (the
//     NumPy binding retakes the GIL there to run signal handlers and looks
//     at close(); the torch ops look at close() and run signal handlers
//     too). The hook returns false, or throws, to end the call.
//
// Plain C++17: no Python and no torch types.
#pragma once

#include <stdint.h>

#include <cmath>
#include <utility>

#include "ring.h"
#include "slots.h"
#include "stream.h"

namespace torch_shmem {
namespace core {

// Spin budget before parking on the futex in a wait (wake-up latency vs
// CPU). Whether a wait spins at all is decided per wait (wait_policy.h).
constexpr double kWaitSpin = 50e-6;
// wait_until's `spin` default: decide from the stream's publication gaps.
constexpr double kAdaptiveSpin = -1;
// Longest slice of a blocking call: the longest a pending signal or a
// close() from another thread waits to be noticed.
constexpr double kLockSlice = 0.05;
constexpr double kWaitSlice = 0.1;

// A point on the monotonic clock, and the timeout it was made from (for
// messages). timeout < 0: no limit.
struct Deadline {
  double at = INFINITY;
  double timeout = -1;
  static Deadline after(double timeout) {
    Deadline d;
    d.timeout = timeout;
    d.at = timeout < 0 ? INFINITY : now_monotonic() + timeout;
    return d;
  }
  double remaining() const { return at - now_monotonic(); }
  bool passed() const { return now_monotonic() >= at; }
};

// The binding's between-slices hook: a non-owning reference to a callable
// `bool()` (true: go on). Only called on the slow path.
class Interrupt {
 public:
  template <typename F>
  Interrupt(F& f)  // NOLINT: implicit, from a lambda lvalue
      : obj_(&f), call_([](void* o) { return (*static_cast<F*>(o))(); }) {}
  bool operator()() const { return call_(obj_); }

 private:
  void* obj_;
  bool (*call_)(void*);
};

// How a blocking call ended.
enum class Blocked {
  kDone,         // lock taken / publication there
  kInterrupted,  // the hook returned false
  kGone,         // wait only: the generation was unlinked (see wait_slice)
};

class Session {
 public:
  // slots: the slot memory of a slotted stream (nullptr: CPU payload).
  Session(Stream& s, SlotMemory* slots) : s_(s), slots_(slots) {}

  Stream& stream() const { return s_; }
  SlotMemory* slots() const { return slots_; }

  // ---- payload: one interface for host payload and slot memory ---------
  // (on_device: src/dst is device memory; slotted streams only.)
  // at: CPU streams only (Stream::write_locked); 0 elsewhere.
  uint64_t write_locked(const void* src, bool src_on_device, bool has_frame_id,
                        uint64_t frame_id, uint64_t at = 0) const {
    if (slots_ == nullptr) return s_.write_locked(src, has_frame_id, frame_id, at);
    if (s_.geometry()->flags & kFlagRing)  // a GPU ring (CPU rings have no slots_)
      return device_ring_write_locked(s_, *slots_, src, src_on_device, has_frame_id, frame_id);
    return slot_write_locked(s_, *slots_, src, src_on_device, has_frame_id, frame_id);
  }
  // Publishes an all-zero payload.
  uint64_t clear_locked() const;
  bool read_fast(void* dst, bool dst_on_device, Snapshot* snap) const {
    return slots_ ? slot_read_fast(s_, *slots_, dst, dst_on_device, snap)
                  : s_.read_fast(dst, snap);
  }
  Snapshot read_locked(void* dst, bool dst_on_device) const {
    return slots_ ? slot_read_locked(s_, *slots_, dst, dst_on_device)
                  : s_.read_locked(dst);
  }

  // ---- blocking -----------------------------------------------------------
  // Takes the lock (one try first, then slices). Throws kTimeout when the
  // deadline passes.
  Blocked lock_until(const Deadline& d, Interrupt interrupt) const;
  // Until count > after: spins for `spin` seconds (kAdaptiveSpin: for
  // wait_spin()), then parks in slices. Throws kTimeout when the deadline
  // passes.
  Blocked wait_until(uint64_t after, const Deadline& d, Interrupt interrupt,
                     double spin = kAdaptiveSpin) const;
  // The spin a wait starting now gets under TORCH_SHMEM_WAIT_SPIN: kWaitSpin
  // or 0 (adaptive: from the stream's GapEstimator, after showing it the
  // latest publication). Throws kValue for an invalid setting.
  double wait_spin() const;
  // A consistent snapshot: lock-free, else under the lock (taken with
  // lock_until). kDone: *snap describes what dst holds.
  Blocked read(void* dst, bool dst_on_device, const Deadline& d, Interrupt interrupt,
               Snapshot* snap) const;

  // ---- rings (ring.h) -------------------------------------------------
  // A whole write to a ring: takes the lock (re-entrant), applies the
  // policy, publishes, releases. *count is the new count, 0 when the policy
  // dropped the write (drop_newest). Under `block` it waits, in slices,
  // until every live cursor consumed the publication the write would
  // overwrite; while waiting it releases the lock unless the calling thread
  // also holds it in an outer scope. Throws kTimeout naming the lagging
  // cursor. at > count + 1 (CPU rings): publishes at count `at`, skipping
  // the counts in between (ring.h); the policy then waits for, or drops on,
  // the cursors that have not consumed what the skip takes over. A GPU ring
  // ignores `at`: it publishes count + 1.
  // (src_on_device: GPU rings only.)
  Blocked ring_write(const void* src, bool has_frame_id, uint64_t frame_id, const Deadline& d,
                     Interrupt interrupt, uint64_t* count, bool src_on_device = false,
                     uint64_t at = 0) const;
  // The next publication for cursor `index` (blocks until there is one);
  // *missed: publications the cursor skipped because they were overwritten.
  // On a GPU ring the copy into dst is queued on the reader queue (the
  // current CUDA stream) and not waited for (ring.h, "GPU rings").
  Blocked ring_next(uint32_t index, void* dst, const Deadline& d, Interrupt interrupt,
                    Snapshot* snap, uint64_t* missed, bool dst_on_device = false) const;
  // Registers (or resumes) the cursor `name` for this process, under the lock
  // (on a GPU ring also sets its device counter to its position).
  Blocked ring_attach(const std::string& name, const Deadline& d, Interrupt interrupt,
                      uint32_t* index) const;

 private:
  void require_ring_slots() const;
  // Waits until cursor `cur` has something to consume: its position, the
  // oldest publication the ring may still hold past it, the latest.
  Blocked ring_oldest_unread(const RingCursor& cur, const Deadline& d, Interrupt interrupt,
                             uint64_t* consumed, uint64_t* c, uint64_t* latest) const;
  Stream& s_;
  SlotMemory* slots_;
};

// Holds a stream's lock for a scope (the lock must already be taken);
// unlock errors are dropped: the scope's own error, if any, is the one that
// matters.
class LockGuard {
 public:
  explicit LockGuard(Stream& s) : s_(&s) {}
  ~LockGuard() { release(); }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;
  void release() {
    if (s_ == nullptr) return;
    Stream* s = s_;
    s_ = nullptr;
    try {
      s->unlock();
    } catch (const Error&) {
    }
  }

 private:
  Stream* s_;
};

}  // namespace core
}  // namespace torch_shmem
