#include "session.h"

#include "ring.h"
#include "stream_internal.h"

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <string>
#include <vector>

namespace torch_shmem {
namespace core {

namespace {

std::string seconds_text(double s) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%.3g", s);
  return buf;
}

// The next slice: at most `longest`, never past the deadline, never < 0.
double slice_of(const Deadline& d, double longest) {
  return std::max(0.0, std::min(longest, d.remaining()));
}

}  // namespace

uint64_t Session::clear_locked() const {
  if (slots_ == nullptr) return s_.clear_locked();
  std::vector<uint8_t> zeros(s_.geometry()->payload_bytes);
  return slot_write_locked(s_, *slots_, zeros.data(), false, false, 0);
}

Blocked Session::lock_until(const Deadline& d, Interrupt interrupt) const {
  if (s_.lock_for(0)) return Blocked::kDone;
  for (;;) {
    if (!interrupt()) return Blocked::kInterrupted;
    if (d.passed())
      throw Error(ErrorKind::kTimeout,
                  "timed out after " + seconds_text(d.timeout) +
                      " s waiting for the write lock (held by pid " +
                      std::to_string(s_.header()->owner_pid.load(std::memory_order_relaxed)) +
                      ")");
    if (s_.lock_for(slice_of(d, kLockSlice))) return Blocked::kDone;
  }
}

SpinMode spin_mode() {
  static const SpinMode mode = [] {
    const std::string v = spin_mode_text();
    if (v.empty() || v == "adaptive") return SpinMode::kAdaptive;
    if (v == "always") return SpinMode::kAlways;
    if (v == "off") return SpinMode::kOff;
    return SpinMode::kInvalid;
  }();
  return mode;
}

const char* spin_mode_text() {
  static const std::string text = [] {
    const char* v = std::getenv("TORCH_SHMEM_WAIT_SPIN");
    return std::string(v == nullptr ? "" : v);
  }();
  return text.c_str();
}

double Session::wait_spin() const {
  switch (spin_mode()) {
    case SpinMode::kAlways:
      return kWaitSpin;
    case SpinMode::kOff:
      return 0;
    case SpinMode::kInvalid:
      throw Error(ErrorKind::kValue, std::string("stream '") + s_.name() +
                                         "': environment variable TORCH_SHMEM_WAIT_SPIN='" +
                                         spin_mode_text() +
                                         "' is not one of 'adaptive', 'always', 'off'");
    case SpinMode::kAdaptive:
      break;
  }
  GapEstimator& gaps = s_.gaps();
  uint64_t count = 0;
  int64_t t = 0;
  if (s_.latest_publication(&count, &t)) gaps.observe(count, t);
  return gaps.spin_for(now_realtime_ns(), kWaitSpin);
}

Blocked Session::wait_until(uint64_t after, const Deadline& d, Interrupt interrupt,
                            double spin) const {
  if (spin < 0) spin = wait_spin();
  for (;;) {
    bool gone = false;
    if (s_.wait_slice(after, spin, slice_of(d, kWaitSlice), &gone)) return Blocked::kDone;
    if (gone) return Blocked::kGone;
    spin = 0;
    if (!interrupt()) return Blocked::kInterrupted;
    if (d.passed())
      throw Error(ErrorKind::kTimeout, "timed out after " + seconds_text(d.timeout) +
                                           " s waiting for a write newer than count " +
                                           std::to_string(after));
  }
}

Blocked Session::read(void* dst, bool dst_on_device, const Deadline& d, Interrupt interrupt,
                      Snapshot* snap) const {
  if (read_fast(dst, dst_on_device, snap)) return Blocked::kDone;
  // The writer keeps winning (or died mid-write): take the lock.
  Blocked b = lock_until(d, interrupt);
  if (b != Blocked::kDone) return b;
  LockGuard held(s_);
  *snap = read_locked(dst, dst_on_device);
  return Blocked::kDone;
}

// ---------------------------------------------------------------------------
// Rings
// ---------------------------------------------------------------------------

namespace {

constexpr int kRingTries = 8;  // lapped copies before a reader takes the lock

}  // namespace

// A GPU ring's slots and cursor counters are device memory: only a session
// over its slot memory (the torch ops) can write, attach or read in order.
void Session::require_ring_slots() const {
  if (slots_ == nullptr && is_device_ring(s_.geometry()))
    throw Error(ErrorKind::kState,
                "stream '" + s_.name() +
                    "' is a GPU ring: its publications are in device memory; attach cursors, "
                    "publish and read_next through torch_shmem.ops (cursor, publish, read_next)");
}

Blocked Session::ring_write(const void* src, bool has_frame_id, uint64_t frame_id,
                            const Deadline& d, Interrupt interrupt, uint64_t* count,
                            bool src_on_device, uint64_t at) const {
  require_ring_slots();
  const Header* g = s_.geometry();
  if (slots_ != nullptr) at = 0;  // a GPU ring publishes one count at a time
  RingControl* rc = ring_control(s_);
  bool held = false;
  struct Release {
    const Session* self;
    bool* held;
    ~Release() {
      if (*held) LockGuard(self->s_).release();
    }
  } release{this, &held};
  for (;;) {
    if (!held) {
      Blocked b = lock_until(d, interrupt);
      if (b != Blocked::kDone) return b;
      held = true;
    }
    RingSpace sp = g->ring_policy == kRingOverwrite ? RingSpace() : ring_space(s_, at);
    if (sp.ok) {
      *count = slots_ == nullptr ? ring_write_locked(s_, src, has_frame_id, frame_id, at)
                                 : write_locked(src, src_on_device, has_frame_id, frame_id);
      return Blocked::kDone;
    }
    if (g->ring_policy == kRingDropNewest) {
      rc->drops.fetch_add(1, std::memory_order_relaxed);  // counter only (stat)
      *count = 0;
      return Blocked::kDone;
    }
    // block: register as a waiter, re-check (Dekker pair with the reader's
    // CAS of consumed and its load of space_waiters, both seq_cst), park.
    const uint32_t e = rc->space_epoch.load(std::memory_order_acquire);
    rc->space_waiters.fetch_add(1, std::memory_order_seq_cst);
    sp = ring_space(s_, at);
    if (sp.ok) {
      rc->space_waiters.fetch_sub(1, std::memory_order_seq_cst);
      continue;
    }
    // Only this call's own lock level: let other writers and registering
    // readers in while waiting. An outer level of this thread keeps it.
    if (s_.held_depth() == 1) {
      held = false;
      LockGuard(s_).release();
    }
    // The hook first: a binding releases its global lock there (the NumPy
    // binding: the GIL, which a consumer thread of this process needs).
    bool go = interrupt();
    if (go) {
      const double slice = std::max(0.0, std::min(kWaitSlice, d.remaining()));
      if (slice > 0) futex_wait(&rc->space_epoch, e, slice);
    }
    rc->space_waiters.fetch_sub(1, std::memory_order_seq_cst);
    if (!go || !interrupt()) return Blocked::kInterrupted;
    if (d.passed() && !(sp = ring_space(s_, at)).ok) {
      RingCursor* c = ring_cursor(s_, sp.lagging);
      const uint32_t len = c->name_len < kMaxCursorNameBytes ? c->name_len : kMaxCursorNameBytes;
      throw Error(ErrorKind::kTimeout,
                  "stream '" + s_.name() + "': timed out after " + seconds_text(d.timeout) +
                      " s waiting for room in the ring (policy 'block'): cursor '" +
                      std::string(c->name, len) + "' (pid " + std::to_string(sp.pid) +
                      ") has consumed count " + std::to_string(sp.consumed) +
                      ", and publication " + std::to_string(sp.next) + " would overwrite count " +
                      std::to_string(sp.need));
    }
  }
}

Blocked Session::ring_oldest_unread(const RingCursor& cur, const Deadline& d, Interrupt interrupt,
                                    uint64_t* consumed, uint64_t* c, uint64_t* latest) const {
  const uint64_t n = s_.geometry()->nslots;
  for (;;) {
    *consumed = cur.consumed.load(std::memory_order_acquire);
    *latest = s_.seq() >> 1;  // acquire: slots up to latest are complete
    if (*latest > *consumed) break;
    Blocked b = wait_until(*consumed, d, interrupt);
    if (b != Blocked::kDone) return b;
  }
  // The oldest publication the ring may still hold.
  *c = *consumed + 1;
  if (*latest >= n && *c < *latest - n + 1) *c = *latest - n + 1;
  return Blocked::kDone;
}

Blocked Session::ring_next(uint32_t index, void* dst, const Deadline& d, Interrupt interrupt,
                           Snapshot* snap, uint64_t* missed, bool dst_on_device) const {
  require_ring_slots();
  RingCursor* cur = ring_cursor(s_, index);
  if (slots_ != nullptr) {  // a GPU ring: claim, then queue the copy (ring.h)
    uint64_t skipped = 0;
    for (;;) {
      uint64_t consumed, c, latest;
      Blocked b = ring_oldest_unread(*cur, d, interrupt, &consumed, &c, &latest);
      if (b != Blocked::kDone) return b;
      const RingClaim r = device_ring_claim(s_, *slots_, index, consumed, c, dst, dst_on_device, snap);
      if (r == RingClaim::kRaced) continue;
      const uint64_t gap = r == RingClaim::kLost ? c - consumed : c - consumed - 1;
      if (gap) cur->missed.fetch_add(gap, std::memory_order_relaxed);
      skipped += gap;
      ring_wake_writers(s_);
      if (r == RingClaim::kQueued) {
        *missed = skipped;
        return Blocked::kDone;
      }
    }
  }
  int tries = 0;
  uint64_t skipped = 0;  // lost publications the cursor moved past on the way
  for (;;) {
    uint64_t consumed, c, latest;
    Blocked b = ring_oldest_unread(*cur, d, interrupt, &consumed, &c, &latest);
    if (b != Blocked::kDone) return b;
    bool got = false;
    while (c <= latest && tries < kRingTries) {
      // Skipped by the writer, or its slot already taken by a later count:
      // lost, and no copy to make (not a try: nothing raced).
      if (ring_passed(s_, c)) {
        ++c;
        continue;
      }
      if (ring_copy(s_, c, dst, snap)) {
        got = true;
        break;
      }
      ++c;  // slot rewritten by c + N or later: c is gone
      ++tries;
    }
    if (!got && c <= latest) {
      // The writer keeps lapping this reader: take the newest publication
      // under the lock, where no writer can move.
      Blocked b = lock_until(d, interrupt);
      if (b != Blocked::kDone) return b;
      LockGuard held(s_);
      const uint64_t seq = s_.seq();
      c = latest = seq >> 1;
      tries = 0;
      got = ring_copy(s_, c, dst, snap);
      // With the lock held the newest count is intact, except after a
      // skipping writer that died in its host window (seq odd): then it is
      // one of the skipped counts.
      if (!got && !(seq & 1)) throw_torn(s_.name());
    }
    if (!got) {
      // Every count up to latest is lost (none is ever published again):
      // move the cursor past them, and wait for the next publication.
      if (cur->consumed.compare_exchange_strong(consumed, latest, std::memory_order_seq_cst)) {
        cur->missed.fetch_add(latest - consumed, std::memory_order_relaxed);
        skipped += latest - consumed;
        ring_wake_writers(s_);
      }
      continue;
    }
    // Claim c for this cursor. seq_cst: the reader's half of the Dekker
    // pair with a writer blocked for room (ring_wake_writers loads
    // space_waiters after it). A failed CAS: another thread sharing the
    // cursor consumed meanwhile; start again from its position.
    if (!cur->consumed.compare_exchange_strong(consumed, c, std::memory_order_seq_cst)) continue;
    const uint64_t gap = c - consumed - 1;
    if (gap) cur->missed.fetch_add(gap, std::memory_order_relaxed);
    *missed = skipped + gap;
    ring_wake_writers(s_);
    return Blocked::kDone;
  }
}

Blocked Session::ring_attach(const std::string& name, const Deadline& d, Interrupt interrupt,
                             uint32_t* index) const {
  require_ring_slots();
  Blocked b = lock_until(d, interrupt);
  if (b != Blocked::kDone) return b;
  LockGuard held(s_);
  *index = core::ring_attach(s_, name);
  if (slots_ != nullptr)  // a GPU ring: the device counter starts at the cursor's position
    slots_->force_cursor(*index,
                         ring_cursor(s_, *index)->consumed.load(std::memory_order_relaxed));
  return Blocked::kDone;
}

}  // namespace core
}  // namespace torch_shmem
