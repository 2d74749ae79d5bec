// Rings (see ring.h): the writer's room check and publication, the cursor
// table, and the reader's copy of one publication.
#include "ring.h"

#include <errno.h>
#include <signal.h>
#include <unistd.h>

#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "slots.h"
#include "stream_internal.h"

namespace torch_shmem {
namespace core {

namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace

RingControl* ring_control(const Stream& s) {
  return reinterpret_cast<RingControl*>(s.slot_area());
}

RingCursor* ring_cursor(const Stream& s, uint32_t index) {
  return reinterpret_cast<RingCursor*>(s.slot_area() + kRingCursorsOffset) + index;
}

RingSlotMeta* ring_meta(const Stream& s, uint32_t slot) {
  return reinterpret_cast<RingSlotMeta*>(s.slot_area() + kRingMetaOffset) + slot;
}

namespace {

// State letter and start time of /proc/PID/stat; false if unreadable.
bool proc_stat(int32_t pid, char* state, uint64_t* start) {
  char path[64];
  snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = fopen(path, "re");
  if (f == nullptr) return false;
  char buf[1024];
  const size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  fclose(f);
  buf[n] = 0;
  const char* p = strrchr(buf, ')');  // the command name may contain anything
  if (p == nullptr) return false;
  ++p;
  // After ')': " S ppid ..." -- field 3 is the state, field 22 the start time.
  unsigned long long st = 0;
  char s = 0;
  if (sscanf(p, " %c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
             &s, &st) != 2)
    return false;
  *state = s;
  *start = st;
  return true;
}

}  // namespace

uint64_t pid_start(int32_t pid) {
  char state;
  uint64_t start = 0;
  return proc_stat(pid, &state, &start) ? start : 0;
}

bool pid_alive(int32_t pid, uint64_t start) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno != EPERM) return false;
  char state = 0;
  uint64_t started = 0;
  if (!proc_stat(pid, &state, &started)) return true;  // cannot tell: alive (the safe side)
  if (state == 'Z' || state == 'X') return false;      // exited, not reaped yet
  return start == 0 || started == start;
}

RingSpace ring_space(const Stream& s, uint64_t at) {
  RingSpace r;
  const Header* g = s.geometry();
  const uint64_t n = g->nslots;
  const uint64_t count = s.header()->seq.load(std::memory_order_relaxed) >> 1;  // lock held
  r.next = std::max(at, count + 1);
  // The slots publication r.next takes (its own and those of the counts it
  // skips) hold publications up to r.next - N, or up to count when the
  // skip reaches past a whole ring: a cursor that consumed `count` never
  // holds the writer.
  const uint64_t reach = std::min(r.next, count + n);
  if (reach <= n) return r;
  const uint64_t need = reach - n;
  r.need = need;
  for (uint32_t i = 0; i < kMaxCursors; ++i) {
    RingCursor* c = ring_cursor(s, i);
    if (c->state.load(std::memory_order_acquire) != kCursorNamed) continue;
    int32_t pid = c->owner_pid.load(std::memory_order_acquire);
    if (pid == 0) continue;
    // seq_cst: the writer's half of the Dekker pair (space_waiters += 1,
    // then this load) with the reader's CAS of consumed.
    const uint64_t consumed = c->consumed.load(std::memory_order_seq_cst);
    if (consumed >= need) continue;
    if (!pid_alive(pid, c->owner_start.load(std::memory_order_relaxed))) {
      // A dead consumer never holds the writer: release its cursor (it
      // keeps its name and position for a consumer that comes back).
      c->owner_pid.compare_exchange_strong(pid, 0, std::memory_order_acq_rel);
      continue;
    }
    r.ok = false;
    r.lagging = i;
    r.consumed = consumed;
    r.pid = pid;
    return r;
  }
  return r;
}

uint64_t ring_write_locked(Stream& s, const void* src, bool has_frame_id, uint64_t frame_id,
                           uint64_t at) {
  Header* h = s.header();
  const Header* g = s.geometry();
  SlotMemory* m = s.host_slots();
  const uint64_t n = g->nslots;
  // An odd seq (a writer that died in the host window) names the same
  // next count: its publication never completed, and cursors may already
  // have passed the counts below it (ring.h, "Crash behaviour").
  const uint64_t next = (h->seq.load(std::memory_order_relaxed) >> 1) + 1;
  const uint64_t c = std::max(at, next);
  // A skip: the counts a cursor may still look for once c is out (from
  // c - N + 1 on; those below it fall out of every cursor's window) are
  // marked as skipped in their slots, whose bytes stay as they are. The
  // marks are ordered before the host window by its release store of seq
  // (begin_write_locked_at).
  for (uint64_t skipped = std::max(next, c > n ? c - n + 1 : 1); skipped < c; ++skipped)
    ring_meta(s, static_cast<uint32_t>(skipped % n))
        ->gen.store(2 * skipped + 1, std::memory_order_relaxed);
  const uint32_t k = static_cast<uint32_t>(c % n);
  RingSlotMeta* meta = ring_meta(s, k);
  m->store_gen(k, 2 * c - 1);  // relaxed store + release fence: odd before any byte
  m->copy_in(k, src, false);
  const int64_t t = now_realtime_ns();
  // frame_id is sticky (as the header's): a write without one keeps the last.
  const uint64_t fid = has_frame_id ? frame_id : h->frame_id.load(std::memory_order_relaxed);
  meta->write_time_ns.store(t, std::memory_order_relaxed);
  meta->frame_id.store(fid, std::memory_order_relaxed);
  m->store_gen(k, 2 * c);  // release: slot bytes and metadata before gen even
  m->store_count(c);
  s.begin_write_locked_at(c);
  h->latest_slot.store(k, std::memory_order_relaxed);
  return s.commit_write_locked(has_frame_id, frame_id, t);
}

bool ring_passed(const Stream& s, uint64_t c) {
  const uint32_t k = static_cast<uint32_t>(c % s.geometry()->nslots);
  return ring_meta(s, k)->gen.load(std::memory_order_relaxed) > 2 * c;
}

uint32_t ring_attach(Stream& s, const std::string& name) {
  const int32_t me = static_cast<int32_t>(getpid());
  const uint64_t hash = fnv1a(name);
  int found = -1, free_entry = -1, reclaim = -1;
  for (uint32_t i = 0; i < kMaxCursors; ++i) {
    RingCursor* c = ring_cursor(s, i);
    const uint32_t st = c->state.load(std::memory_order_acquire);
    if (st == kCursorNamed) {
      if (c->name_hash == hash && c->name_len == name.size() &&
          std::memcmp(c->name, name.data(), name.size()) == 0) {
        found = static_cast<int>(i);
        break;
      }
      const int32_t pid = c->owner_pid.load(std::memory_order_acquire);
      if (reclaim < 0 &&
          (pid == 0 || !pid_alive(pid, c->owner_start.load(std::memory_order_relaxed))))
        reclaim = static_cast<int>(i);
    } else if (free_entry < 0) {
      // kCursorSetup under the lock can only be a registration that died
      // half way (it held the lock): free.
      free_entry = static_cast<int>(i);
    }
  }
  if (found >= 0) {
    RingCursor* c = ring_cursor(s, static_cast<uint32_t>(found));
    const int32_t pid = c->owner_pid.load(std::memory_order_acquire);
    if (pid != 0 && pid != me && pid_alive(pid, c->owner_start.load(std::memory_order_relaxed)))
      throw Error(ErrorKind::kState, "stream '" + s.name() + "': cursor '" + name +
                                         "' is held by live process " + std::to_string(pid) +
                                         " (one process per cursor name)");
    // Resume where the previous owner stopped.
    c->owner_start.store(pid_start(me), std::memory_order_relaxed);
    c->last_pid.store(me, std::memory_order_relaxed);
    c->owner_pid.store(me, std::memory_order_seq_cst);
    return static_cast<uint32_t>(found);
  }
  int idx = free_entry >= 0 ? free_entry : reclaim;
  if (idx < 0)
    throw Error(ErrorKind::kState,
                "stream '" + s.name() + "': all " + std::to_string(kMaxCursors) +
                    " cursors are held by live processes; close a cursor (or end its process) "
                    "to free one");
  RingCursor* c = ring_cursor(s, static_cast<uint32_t>(idx));
  // kCursorSetup first (release fence: readers of the table that see a new
  // name also see the state change), then the fields, then kCursorNamed
  // (release): stat() never shows a half-written name as valid.
  c->state.store(kCursorSetup, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  c->owner_pid.store(0, std::memory_order_relaxed);
  std::memset(c->name, 0, sizeof(c->name));
  std::memcpy(c->name, name.data(), name.size());
  c->name_len = static_cast<uint32_t>(name.size());
  c->name_hash = hash;
  c->missed.store(0, std::memory_order_relaxed);
  // A new cursor starts at the current count: it consumes the publications
  // made from now on. (Lock held: no publication can land meanwhile.)
  c->consumed.store(s.header()->seq.load(std::memory_order_relaxed) >> 1,
                    std::memory_order_relaxed);
  c->owner_start.store(pid_start(me), std::memory_order_relaxed);
  c->last_pid.store(me, std::memory_order_relaxed);
  c->owner_pid.store(me, std::memory_order_relaxed);
  c->state.store(kCursorNamed, std::memory_order_seq_cst);
  return static_cast<uint32_t>(idx);
}

void ring_detach(const Stream& s, uint32_t index) {
  if (index >= kMaxCursors) return;
  int32_t me = static_cast<int32_t>(getpid());
  // acq_rel: the cursor's last consumed count is visible to the next owner.
  ring_cursor(s, index)->owner_pid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
  // A writer blocked on this cursor may go on now.
  ring_wake_writers(s);
}

std::vector<CursorInfo> ring_cursors(const Stream& s) {
  std::vector<CursorInfo> out;
  for (uint32_t i = 0; i < kMaxCursors; ++i) {
    RingCursor* c = ring_cursor(s, i);
    if (c->state.load(std::memory_order_acquire) != kCursorNamed) continue;
    CursorInfo info;
    info.index = i;
    const uint32_t len = c->name_len < kMaxCursorNameBytes ? c->name_len : kMaxCursorNameBytes;
    info.name.assign(c->name, len);
    info.owner_pid = c->owner_pid.load(std::memory_order_acquire);
    info.last_pid = c->last_pid.load(std::memory_order_relaxed);
    info.alive = pid_alive(info.owner_pid, c->owner_start.load(std::memory_order_relaxed));
    info.consumed = c->consumed.load(std::memory_order_acquire);
    info.missed = c->missed.load(std::memory_order_relaxed);
    out.push_back(info);
  }
  return out;
}

bool ring_copy(const Stream& s, uint64_t c, void* dst, Snapshot* snap) {
  const Header* g = s.geometry();
  const uint32_t k = static_cast<uint32_t>(c % g->nslots);
  const RingSlotMeta* meta = ring_meta(s, k);
  racy_copy(dst, s.host_slots()->slot_ptr(k), g->payload_bytes);
  const int64_t t = meta->write_time_ns.load(std::memory_order_relaxed);
  const uint64_t fid = meta->frame_id.load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);  // copy and metadata before the re-load
  const uint64_t gen = meta->gen.load(std::memory_order_relaxed);
  if (gen != 2 * c) {
    if (gen < 2 * c)  // c was published, so its slot's generation reached 2c
      throw Error(ErrorKind::kValue, "stream '" + s.name() + "': corrupted ring slot generation");
    return false;
  }
  snap->seq = 2 * c;
  snap->count = c;
  snap->write_time_ns = t;
  snap->frame_id = fid;
  return true;
}

namespace {

// The steps a GPU ring adds to slot_write_locked (ring.h, "GPU rings").
class DeviceRingSteps : public SlotWriteSteps {
 public:
  DeviceRingSteps(Stream& s, SlotMemory& m, bool has_frame_id, uint64_t frame_id)
      : s_(s), m_(m), has_frame_id_(has_frame_id), frame_id_(frame_id) {}

  void before_copy(uint64_t c, uint32_t k) override {
    // seq_cst: the writer's half of the Dekker pair (this store, then the
    // loads of consumed) with a reader's CAS of consumed and load of gen.
    ring_meta(s_, k)->gen.store(2 * c - 1, std::memory_order_seq_cst);
    const uint64_t n = s_.geometry()->nslots;
    if (c <= n) return;
    const uint64_t need = c - n;
    std::vector<uint32_t> queued;
    for (uint32_t i = 0; i < kMaxCursors; ++i) {
      RingCursor* cur = ring_cursor(s_, i);
      if (cur->state.load(std::memory_order_acquire) != kCursorNamed) continue;
      // A cursor behind `need` never copies it from now on: it finds the
      // slot taken. One at or past it may still be copying slot k (also a
      // released one: its process may have the copy queued).
      if (cur->consumed.load(std::memory_order_seq_cst) < need) continue;
      // A device-side wait costs the host nothing (one that is already
      // satisfied passes at once on the device); reading the counter from
      // the host would be a round trip per cursor.
      if (m_.queue_wait_cursor(i, need)) {
        queued.push_back(i);
      } else {
        poll_cursor(i, need);
      }
    }
    if (!queued.empty())
      m_.finish_writer_while([&] {
        for (uint32_t i : queued) release_if_dead(i, need);
      });
  }

  int64_t before_publish(uint64_t c, uint32_t k) override {
    RingSlotMeta* meta = ring_meta(s_, k);
    const int64_t t = now_realtime_ns();
    // frame_id is sticky (as the header's): a write without one keeps the last.
    meta->write_time_ns.store(t, std::memory_order_relaxed);
    meta->frame_id.store(
        has_frame_id_ ? frame_id_ : s_.header()->frame_id.load(std::memory_order_relaxed),
        std::memory_order_relaxed);
    meta->gen.store(2 * c, std::memory_order_release);  // metadata before gen even
    return t;
  }

  void failed(uint64_t c, uint32_t k) override {
    // Odd and past 2c: readers take both c and the count slot k held as gone.
    ring_meta(s_, k)->gen.store(2 * c + 1, std::memory_order_release);
  }

 private:
  // The host backend's reader copies in its own call: wait for that call,
  // releasing a reader that died in it.
  void poll_cursor(uint32_t i, uint64_t need) {
    auto next_check = std::chrono::steady_clock::now();
    std::chrono::microseconds nap(20);
    while (m_.load_cursor(i) < need) {
      if (std::chrono::steady_clock::now() >= next_check) {
        if (release_if_dead(i, need)) return;
        next_check = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
      }
      std::this_thread::sleep_for(nap);
      if (nap < std::chrono::microseconds(1000)) nap *= 2;
    }
  }

  // A cursor whose process died with its copy queued never stores its
  // counter: release it (it keeps its name and position) and store the
  // counter for it, up to its position, which ends the writer queue's wait
  // and every later one for publications it claimed.
  bool release_if_dead(uint32_t i, uint64_t need) {
    RingCursor* cur = ring_cursor(s_, i);
    int32_t pid = cur->owner_pid.load(std::memory_order_acquire);
    const int32_t who = pid != 0 ? pid : cur->last_pid.load(std::memory_order_relaxed);
    if (pid_alive(who, cur->owner_start.load(std::memory_order_relaxed))) return false;
    if (pid != 0) cur->owner_pid.compare_exchange_strong(pid, 0, std::memory_order_acq_rel);
    m_.force_cursor(i, std::max(need, cur->consumed.load(std::memory_order_acquire)));
    return true;
  }

  Stream& s_;
  SlotMemory& m_;
  bool has_frame_id_;
  uint64_t frame_id_;
};

}  // namespace

uint64_t device_ring_write_locked(Stream& s, SlotMemory& m, const void* src, bool src_on_device,
                                  bool has_frame_id, uint64_t frame_id) {
  DeviceRingSteps steps(s, m, has_frame_id, frame_id);
  return slot_write_locked(s, m, src, src_on_device, has_frame_id, frame_id, &steps);
}

RingClaim device_ring_claim(const Stream& s, SlotMemory& m, uint32_t index, uint64_t consumed,
                            uint64_t c, void* dst, bool dst_on_device, Snapshot* snap) {
  RingCursor* cur = ring_cursor(s, index);
  // seq_cst: the reader's half of the Dekker pair with the writer's odd gen.
  if (!cur->consumed.compare_exchange_strong(consumed, c, std::memory_order_seq_cst))
    return RingClaim::kRaced;
  const uint32_t k = static_cast<uint32_t>(c % s.geometry()->nslots);
  const RingSlotMeta* meta = ring_meta(s, k);
  if (meta->gen.load(std::memory_order_seq_cst) != 2 * c) {
    // Overwritten (a published c had gen 2c, which only grows). The
    // counter still moves to c: a writer may wait for it.
    m.copy_out_then_store_cursor(k, nullptr, dst_on_device, index, c);
    return RingClaim::kLost;
  }
  // gen 2c (acquire) was stored after the metadata, and slot k keeps c
  // until this cursor's counter reaches c: both are stable here.
  snap->seq = 2 * c;
  snap->count = c;
  snap->write_time_ns = meta->write_time_ns.load(std::memory_order_relaxed);
  snap->frame_id = meta->frame_id.load(std::memory_order_relaxed);
  m.copy_out_then_store_cursor(k, dst, dst_on_device, index, c);
  return RingClaim::kQueued;
}

void ring_wake_writers(const Stream& s) {
  RingControl* rc = ring_control(s);
  // seq_cst: the reader's half of the Dekker pair (CAS of consumed, then
  // this load) with a writer registering in space_waiters.
  if (rc->space_waiters.load(std::memory_order_seq_cst) == 0) return;
  rc->space_epoch.fetch_add(1, std::memory_order_seq_cst);
  futex_wake(&rc->space_epoch);
}

}  // namespace core
}  // namespace torch_shmem
