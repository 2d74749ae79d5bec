// The publication protocol of the CPU payload: the seqlock writer
// (publication under the lock), the lock-free snapshot reader, and waiting
// for a publication on the epoch futex.
#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "notify.h"
#include "ring.h"
#include "slots.h"
#include "stream_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#endif

namespace torch_shmem {
namespace core {

namespace {

struct StreamingCopySetting {
  size_t bytes = size_t(8) << 20;
  std::string invalid;  // the variable's value when it is not a byte count
};

const StreamingCopySetting& streaming_copy_setting() {
  static const StreamingCopySetting setting = [] {
    StreamingCopySetting s;
    const char* v = std::getenv("TORCH_SHMEM_STREAMING_COPY");
    if (v == nullptr || *v == 0) return s;
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(v, &end, 10);
    if (end == v || *end != 0 || errno != 0 || *v == '-') {
      s.invalid = v;
      return s;
    }
    s.bytes = n == 0 ? SIZE_MAX : static_cast<size_t>(n);
    return s;
  }();
  return setting;
}

}  // namespace

size_t streaming_copy_bytes() { return streaming_copy_setting().bytes; }

void check_streaming_copy_setting(const std::string& name) {
  const StreamingCopySetting& s = streaming_copy_setting();
  if (!s.invalid.empty())
    throw Error(ErrorKind::kValue, "stream '" + name +
                                       "': environment variable TORCH_SHMEM_STREAMING_COPY='" +
                                       s.invalid + "' is not a byte count (0: never stream)");
}

void publish_copy(void* dst, const void* src, size_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (n >= streaming_copy_bytes()) {
    auto* d = static_cast<uint8_t*>(dst);
    auto* s = static_cast<const uint8_t*>(src);
    // Streaming stores may pass older stores (Intel SDM vol. 3, 8.2.2): the
    // fence first makes the odd seq or generation that precedes this copy
    // visible before any byte of it, as the release fence orders ordinary
    // stores.
    _mm_sfence();
    const size_t head =  // to 16-byte alignment (payloads and slots are aligned: 0)
        std::min(n, static_cast<size_t>((16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15));
    std::memcpy(d, s, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    std::memcpy(d + i, s + i, n - i);
    _mm_sfence();  // the streaming stores are ordered before whatever the caller publishes
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

namespace {

// Length of the pause-only phase at the start of a spinning wait.
constexpr double kPureSpinSeconds = 5e-6;

constexpr int kFastTries = 4;           // full-copy attempts before the lock
constexpr double kOddSpinSeconds = 20e-6;  // spin on an odd seq before the lock


}  // namespace

// ---------------------------------------------------------------------------
// Publication (seqlock writer). Caller holds the lock, so seq only changes
// here. Ordering:
//   seq <- odd (relaxed) ; fence(release)     -- seq odd is visible before
//                                                 any payload byte changes
//   payload, write_time, frame_id stores
//   seq <- even (release)                      -- payload visible before even
//   epoch += 1 (seq_cst) ; if waiters: wake     -- Dekker pair with wait_slice
//   if armed_readers: signal them               -- the same pair with Notifier::rearm
// ---------------------------------------------------------------------------

void Stream::begin_locked() {
  uint64_t s = hdr_->seq.load(std::memory_order_relaxed);
  if ((s & 1) == 0) {
    hdr_->seq.store(s + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
  }
  // An odd seq here means a dead or aborted writer left a torn payload;
  // it stays odd and this write repairs it.
}

uint64_t Stream::publish_locked(bool has_frame_id, uint64_t frame_id, int64_t write_time_ns) {
  uint64_t s = hdr_->seq.load(std::memory_order_relaxed);  // odd
  hdr_->write_time_ns.store(write_time_ns != 0 ? write_time_ns : now_realtime_ns(),
                            std::memory_order_relaxed);
  if (has_frame_id) hdr_->frame_id.store(frame_id, std::memory_order_relaxed);
  hdr_->broken.store(0, std::memory_order_relaxed);
  hdr_->seq.store(s + 1, std::memory_order_release);
  hdr_->epoch.fetch_add(1, std::memory_order_seq_cst);
  if (hdr_->waiters.load(std::memory_order_seq_cst) != 0) futex_wake(&hdr_->epoch);
  signal_armed(hdr_);  // readiness descriptors (notify.h): same Dekker pair
  return (s + 1) >> 1;
}

void Stream::require_cpu_payload(bool writing) const {
  if (geometry()->flags & kFlagGpu) {  // the validated copy, never the shared header
    if (writing)
      throw Error(ErrorKind::kState, "stream '" + name_ +
                                         "' is a GPU stream: write to it through a GPU "
                                         "attachment (torch_shmem.open('" + name_ +
                                         "', gpu_device='cuda:N'))");
    if (payload_ == nullptr)
      throw Error(ErrorKind::kState, "stream '" + name_ +
                                         "' is a GPU stream without a CPU mirror: attach to "
                                         "it with torch_shmem.open('" + name_ +
                                         "', gpu_device='cuda:N') to read it");
  }
}

uint64_t Stream::write_locked(const void* src, bool has_frame_id, uint64_t frame_id, uint64_t at) {
  if (geometry()->flags & kFlagRing)
    return ring_write_locked(*this, src, has_frame_id, frame_id, at);
  // the next count (odd seq: a torn write's) needs no skip
  if (at <= (hdr_->seq.load(std::memory_order_relaxed) >> 1) + 1) at = 0;
  if (host_slots_) {
    if (rotates_slots())
      return slot_write_locked(*this, *host_slots_, src, false, has_frame_id, frame_id, nullptr,
                               at);
    // no reader overlapped a write yet, or a live view pinned the slot:
    // rewrite the latest slot in place, as a single payload
    begin_write_locked(at, true);
    publish_copy(payload(), src, payload_bytes_);
    return commit_write_locked(has_frame_id, frame_id);
  }
  require_cpu_payload(true);
  begin_write_locked(at, true);  // a single payload: begin_locked() or the skipping odd seq
  publish_copy(payload_, src, payload_bytes_);
  return publish_locked(has_frame_id, frame_id);
}

uint64_t Stream::clear_locked() {
  if (host_slots_) {
    std::vector<uint8_t> zeros(payload_bytes_);
    return write_locked(zeros.data(), false, 0);
  }
  require_cpu_payload(true);
  begin_locked();
  std::memset(payload_, 0, payload_bytes_);
  return publish_locked(false, 0);
}

// In-place writes of a kFlagHostSlots stream go to the slot of the next
// publication c, which first receives the latest publication (an in-place
// producer may edit only part of it; a `whole` writer overwrites every
// byte, so the copy is skipped): seq odd (readers wait for the commit or
// queue on the lock, as for a single payload), gen[k] odd, latest_slot
// <- k, so that payload() is the slot being written until the commit. An
// odd seq left by a dead or aborted writer already names publication c and
// its slot.
void Stream::begin_write_locked(uint64_t at, bool whole) {
  if (at == 0)
    begin_locked();
  else
    begin_write_locked_at(at);  // seq = 2 * at - 1: the slot below is at's
  if (!host_slots_) return;
  const Header* g = geometry();
  const uint64_t c = (hdr_->seq.load(std::memory_order_relaxed) >> 1) + 1;
  const uint32_t pinned = live_slot();
  const uint32_t latest = hdr_->latest_slot.load(std::memory_order_relaxed) % g->nslots;
  const uint32_t k = pinned ? (pinned - 1) % g->nslots
                            : (rotates_slots() ? host_slot_for(*this, c) : latest);
  host_slots_->store_gen(k, 2 * c - 1);
  if (latest != k && !whole)
    publish_copy(host_slots_->slot_ptr(k), host_slots_->slot_ptr(latest), payload_bytes_);
  hdr_->latest_slot.store(k, std::memory_order_relaxed);
}

void Stream::pin_live_slot_locked() {
  if (!host_slots_ || (geometry()->flags & kFlagRing) || live_slot() != 0) return;
  const uint32_t latest = hdr_->latest_slot.load(std::memory_order_relaxed) % geometry()->nslots;
  hdr_->live_slot.store(latest + 1, std::memory_order_relaxed);
}

void Stream::begin_write_locked_at(uint64_t c) {
  const uint64_t s = hdr_->seq.load(std::memory_order_relaxed);
  if (c == (s >> 1) + 1) {  // the usual case: the next count (odd s: a torn write's)
    begin_locked();
    return;
  }
  if (c <= (s >> 1))
    throw Error(ErrorKind::kState, "stream '" + name_ + "': publication " + std::to_string(c) +
                                       " is not past count " + std::to_string(s >> 1));
  // Skipping counts: seq odd as in begin_locked (release fence before any
  // byte of the host window changes). The store itself is a release too:
  // seq 2c - 1 already shows counts up to c - 1, none of which was
  // published, so what the writer stored for them before (a ring's skip
  // marks and slot c, ring.h) must be visible to a reader that sees it.
  hdr_->seq.store(2 * c - 1, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_release);
}

uint64_t Stream::commit_write_locked(bool has_frame_id, uint64_t frame_id, int64_t write_time_ns) {
  // The slot of an in-place write (begin_write_locked). slot_write_locked
  // also ends here, after storing the same generation and count itself.
  if (host_slots_) {
    const uint64_t c = (hdr_->seq.load(std::memory_order_relaxed) >> 1) + 1;
    const uint32_t k = hdr_->latest_slot.load(std::memory_order_relaxed) % geometry()->nslots;
    host_slots_->store_gen(k, 2 * c);
    host_slots_->store_count(c);
  }
  return publish_locked(has_frame_id, frame_id, write_time_ns);
}

void Stream::abort_write_locked() {
  // seq stays odd: the payload may be partially written.
  hdr_->broken.store(1, std::memory_order_release);
  hdr_->epoch.fetch_add(1, std::memory_order_seq_cst);
  if (hdr_->waiters.load(std::memory_order_seq_cst) != 0) futex_wake(&hdr_->epoch);
  signal_armed(hdr_);  // readiness descriptors (notify.h): same Dekker pair
}

// ---------------------------------------------------------------------------
// Snapshot (seqlock reader):
//   s1 <- seq (acquire); odd -> writer active (spin briefly) or broken
//   copy payload, load write_time/frame_id (relaxed)
//   fence(acquire); s2 <- seq (relaxed)    -- copy happens-before the re-load
//   s1 == s2 -> the copy is exactly the write that produced s1
// After kFastTries changed-under-us copies, or kOddSpinSeconds of odd seq,
// the reader takes the lock: that bounds its work and guarantees progress
// against a writer that never pauses.
// ---------------------------------------------------------------------------

bool Stream::read_fast(void* dst, Snapshot* snap) const {
  if (host_slots_) return slot_read_fast(*this, *host_slots_, dst, false, snap);
  require_cpu_payload(false);
  double spin_start = -1;
  int tries = 0;
  for (;;) {
    uint64_t s1 = hdr_->seq.load(std::memory_order_acquire);
    if (s1 & 1) {
      if (hdr_->broken.load(std::memory_order_acquire)) throw_torn(name_);
      double now = now_monotonic();
      if (spin_start < 0) spin_start = now;
      if (now - spin_start > kOddSpinSeconds) return false;
      for (int i = 0; i < 16; ++i) TSHM_CPU_RELAX();
      continue;
    }
    racy_copy(dst, payload_, payload_bytes_);
    int64_t t = hdr_->write_time_ns.load(std::memory_order_relaxed);
    uint64_t fid = hdr_->frame_id.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    uint64_t s2 = hdr_->seq.load(std::memory_order_relaxed);
    if (s1 == s2) {
      snap->seq = s1;
      snap->count = s1 >> 1;
      snap->write_time_ns = t;
      snap->frame_id = fid;
      return true;
    }
    if (++tries >= kFastTries) return false;
  }
}

Snapshot Stream::read_locked(void* dst) const {
  require_cpu_payload(false);
  uint64_t s = hdr_->seq.load(std::memory_order_acquire);
  if (s & 1) {
    if (hdr_->broken.load(std::memory_order_acquire)) throw_torn(name_);
    throw Error(ErrorKind::kState, "stream '" + name_ +
                                       "': cannot take a snapshot while this thread "
                                       "has a write in progress");
  }
  if (host_slots_) return slot_read_locked(*this, *host_slots_, dst, false);
  std::memcpy(dst, payload_, payload_bytes_);
  Snapshot snap;
  snap.seq = s;
  snap.count = s >> 1;
  snap.write_time_ns = hdr_->write_time_ns.load(std::memory_order_relaxed);
  snap.frame_id = hdr_->frame_id.load(std::memory_order_relaxed);
  return snap;
}

// ---------------------------------------------------------------------------
// Waiting. Reader side of the Dekker pair with publish_locked:
//   e <- epoch (acquire); check count
//   waiters += 1 (seq_cst); re-check count (seq_cst)
//   futex_wait(epoch, e)   -- returns at once if a publication bumped epoch
// Either the writer sees waiters > 0 and wakes, or the reader sees the new
// seq/epoch; a wake can never be lost.
//
// Unlink (unlink_name) stores unlinked = 1 (release), then bumps epoch
// (seq_cst) and wakes every parked reader unconditionally. A reader that
// loaded e after that bump also sees the flag (acquire on epoch); one that
// loaded e before it finds epoch != e in futex_wait or is woken, and
// re-reads epoch (acquire) before looking at the flag again. So a reader
// that checks the flag after loading e never sleeps through an unlink.
// ---------------------------------------------------------------------------

bool Stream::wait_slice(uint64_t after, double spin_seconds, double seconds, bool* gone) const {
  // count (= seq / 2) moved past `after`
  auto newer = [&](std::memory_order mo = std::memory_order_acquire) {
    return (hdr_->seq.load(mo) >> 1) > after;
  };
  // The generation was unlinked and nothing newer than `after` is there.
  auto ended = [&] {
    if (gone == nullptr || hdr_->unlinked.load(std::memory_order_acquire) == 0) return false;
    if (newer()) return false;
    *gone = true;
    return true;
  };
  if (gone != nullptr) *gone = false;
  if (newer()) return true;
  if (ended()) return false;
  if (spin_seconds > 0) {
    // Spin briefly for microsecond wake-ups. The first few microseconds
    // poll with pause only (a sched_yield costs ~0.7 us, which would be
    // most of a handoff's latency when the writer runs on another CPU);
    // after that, yield between polls: on a machine with few cores the
    // writer we wait for may be runnable on this very CPU, and a pure
    // busy-wait would delay it by the whole spin.
    const double start = now_monotonic();
    const double end = start + spin_seconds;
    const double pure_end = start + (spin_seconds < kPureSpinSeconds ? spin_seconds : kPureSpinSeconds);
    do {
      for (int i = 0; i < 16; ++i) {
        TSHM_CPU_RELAX();
        if (newer()) return true;
      }
    } while (now_monotonic() < pure_end);
    do {
      for (int i = 0; i < 8; ++i) TSHM_CPU_RELAX();
      if (newer()) return true;
      sched_yield();
    } while (now_monotonic() < end);
  }
  if (seconds <= 0) {
    ended();
    return false;
  }
  uint32_t e = hdr_->epoch.load(std::memory_order_acquire);
  if (newer()) return true;
  if (ended()) return false;  // after loading e: see the comment above
  auto* waiters = const_cast<std::atomic<uint32_t>*>(&hdr_->waiters);
  waiters->fetch_add(1, std::memory_order_seq_cst);
  if (newer(std::memory_order_seq_cst)) {  // Dekker pair with publish_locked
    waiters->fetch_sub(1, std::memory_order_seq_cst);
    return true;
  }
  futex_wait(&hdr_->epoch, e, seconds);
  waiters->fetch_sub(1, std::memory_order_seq_cst);
  (void)hdr_->epoch.load(std::memory_order_acquire);
  if (newer()) return true;
  ended();
  return false;
}

bool Stream::latest_publication(uint64_t* count, int64_t* write_time_ns) const {
  const uint64_t s1 = hdr_->seq.load(std::memory_order_acquire);
  if (s1 & 1) return false;
  const int64_t t = hdr_->write_time_ns.load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  if (hdr_->seq.load(std::memory_order_relaxed) != s1) return false;
  *count = s1 >> 1;
  *write_time_ns = t;
  return true;
}

void Stream::wake_all() const {
  auto* epoch = const_cast<std::atomic<uint32_t>*>(&hdr_->epoch);
  epoch->fetch_add(1, std::memory_order_seq_cst);
  futex_wake(epoch);
  signal_armed(const_cast<Header*>(hdr_));
}

}  // namespace core
}  // namespace torch_shmem
