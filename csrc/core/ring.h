// Rings: a slotted CPU stream (kFlagHostSlots | kFlagRing) whose readers
// consume every publication in order through named cursors kept in the
// segment, with a policy for a writer that would overwrite a publication a
// live cursor has not consumed yet.
//
// Slot area (from segment offset 4096; device_bytes = ring_slots_base(N) +
// N * slot_stride, the segment rounds it up to a page):
//
//   +0        RingControl: count word (the slots' count, unused by CPU
//             readers) | drops | space_epoch + space_waiters (futex of a
//             writer waiting for room), each on its own 128-byte line
//   +4096     RingCursor[32], 128 bytes each (one line per reader)
//   +8192     RingSlotMeta[N], 32 bytes each: gen (odd while slot k is
//             written, 2c once it holds publication c, 2s + 1 once the
//             writer skipped count s), write_time_ns and frame_id of that
//             publication
//   +8192 + round_up(32 N, 4096)
//             slot 0 .. slot N-1, slot_stride apart; publication c in
//             slot c % N
//
// Writer (holds the stream lock), publication c past count p (c = p + 1,
// or later: a skip, see below), k = c % N:
//   [block / drop_newest] every live cursor must have consumed
//   min(c - N, p): what the slots this write takes hold (c - N, or p when
//   the skip spans the ring); a cursor that consumed p never holds it
//   skip: gen[s % N] <- 2s + 1 (relaxed) for s in [max(p + 1, c - N + 1),
//   c - 1]                                        -- "s was skipped"
//   gen[k] <- 2c - 1 (relaxed) ; fence(release)   -- odd before any byte
//   copy ; meta write_time, frame_id (relaxed)
//   gen[k] <- 2c (release)                        -- bytes + meta before even
//   host window as for slots (seq odd, latest_slot, seq even, wake); a
//   skip's seq 2c - 1 is a release store (Stream::begin_write_locked_at):
//   it shows the skipped counts up to c - 1, so their marks and gen[k]
//   (which took the slot of c - N) must be visible with it
// Skipped counts s < c - N + 1 get no mark: a reader that sees the window
// (latest >= c - 1) starts at c - N or later, and slot (c - N) % N is k.
// Reader (cursor consumed L, no lock):
//   latest <- seq / 2 (acquire); wait on the epoch futex while latest <= L
//   for c from max(L + 1, latest - N + 1) to latest:
//     gen (relaxed) > 2c: c is lost (skipped, or its slot rewritten by
//     c + N or later), no copy; next c
//     copy slot c % N, meta (relaxed); fence(acquire); g <- gen
//     (relaxed): g == 2c means exactly publication c (gen was >= 2c when
//     latest was published); g > 2c: c is lost, next c (after 8 such
//     copies: take the lock and read the newest); g < 2c: corrupted
//   consumed: CAS L -> c (seq_cst); missed = c - L - 1; then, if
//   space_waiters (seq_cst) != 0: space_epoch += 1, futex wake.
//   every count up to latest lost: CAS L -> latest (missed as above; no
//   count <= latest is ever published again) and wait for latest + 1.
// Blocked writer: e <- space_epoch (acquire); space_waiters += 1 (seq_cst);
//   re-check the cursors (seq_cst loads); futex_wait(space_epoch, e) in
//   slices (a dead reader never wakes it: each slice re-checks liveness).
//   The CAS / waiters pair is a Dekker pair, as publish / wait_slice.
// Crash behaviour: a writer that dies before its host window (seq even,
// count p) leaves marks and a torn slot k for counts > p that nobody has
// seen: readers keep reading counts <= p (those whose slots the write took
// are lost, as for any write), and the next writer starts at p + 1 again.
// Its gen stores may go below a dead writer's marks (2s - 1 after
// 2s + 1), but stay above 2p: readers of counts <= p still find those
// slots lost, and a count published later rewrites its own slot first.
// A writer that dies in the host window (seq 2c - 1, the lock's recovery
// marks the stream broken) leaves counts up to c - 1 shown, of which the
// skipped ones are marked and c - N is in slot k: readers find them lost
// and wait at c - 1; the next writer publishes c (seq stays odd: c is the
// count after seq / 2) or skips past it, never a count below c. The gen
// check stays exact: a slot's gen is >= 2c once a reader may look for c.
#pragma once

#include <stdint.h>

#include <atomic>
#include <string>
#include <vector>

#include "stream.h"

namespace torch_shmem {
namespace core {

enum RingPolicy : uint32_t { kRingOverwrite = 0, kRingBlock = 1, kRingDropNewest = 2 };

constexpr uint32_t kMaxRingSlots = 4096;
constexpr uint32_t kMaxCursors = 32;
constexpr uint32_t kMaxCursorNameBytes = 64;
constexpr uint64_t kRingCursorsOffset = 4096;
constexpr uint64_t kRingMetaOffset = 8192;
constexpr uint64_t kRingMetaBytes = 32;

inline uint64_t ring_slots_base(uint32_t nslots) {
  return kRingMetaOffset + (kRingMetaBytes * nslots + 4095) / 4096 * 4096;
}
inline bool is_ring(const Header* g) { return (g->flags & kFlagRing) != 0; }
// A GPU ring (kFlagGpu | kFlagRing, see "GPU rings" below).
inline bool is_device_ring(const Header* g) {
  return (g->flags & (kFlagRing | kFlagGpu)) == (kFlagRing | kFlagGpu);
}

struct RingControl {
  // The slots' count word (HostSlotMemory::store_count); not read by rings.
  alignas(128) std::atomic<uint64_t> count;
  // drop_newest: writes dropped so far (lock holder, relaxed; stat only).
  alignas(128) std::atomic<uint64_t> drops;
  // Futex word of writers waiting for room (block policy), bumped by a
  // reader that advances while space_waiters != 0.
  alignas(128) std::atomic<uint32_t> space_epoch;
  std::atomic<uint32_t> space_waiters;
};
static_assert(sizeof(RingControl) <= kRingCursorsOffset, "ring control exceeds its page");

// Cursor states.
constexpr uint32_t kCursorFree = 0;
constexpr uint32_t kCursorSetup = 1;  // being (re)named under the stream lock
constexpr uint32_t kCursorNamed = 2;

struct alignas(128) RingCursor {
  // Count of the last publication this cursor consumed (0: none). Advanced
  // only by CAS (seq_cst: the Dekker pair with a blocked writer), so
  // threads sharing the cursor never deliver one publication twice.
  std::atomic<uint64_t> consumed;
  // Process that holds the cursor now (0: none; the cursor then keeps its
  // place, for a consumer that comes back, but never holds the writer).
  // Set under the stream lock; cleared by its owner (close) or by a writer
  // that finds the process dead (CAS).
  std::atomic<int32_t> owner_pid;
  std::atomic<uint32_t> state;  // kCursorFree / kCursorSetup / kCursorNamed
  std::atomic<int32_t> last_pid;  // last owner (for stat after a release)
  uint32_t name_len;              // written under the lock while kCursorSetup
  uint64_t name_hash;             // FNV-1a 64 of the name
  std::atomic<uint64_t> missed;   // publications this cursor skipped (owner)
  char name[80];                  // kMaxCursorNameBytes + NUL, padded
  // The owner's start time (/proc/PID/stat field 22, clock ticks since
  // boot), so that a recycled pid is not taken for the owner.
  std::atomic<uint64_t> owner_start;
};
static_assert(sizeof(RingCursor) == 128, "cursor must be one 128-byte line");
static_assert(offsetof(RingCursor, consumed) == 0 && offsetof(RingCursor, owner_pid) == 8 &&
                  offsetof(RingCursor, state) == 12 && offsetof(RingCursor, name_hash) == 24 &&
                  offsetof(RingCursor, missed) == 32 && offsetof(RingCursor, name) == 40 &&
                  offsetof(RingCursor, owner_start) == 120,
              "cursor layout changed");
static_assert(kMaxCursors * sizeof(RingCursor) <= kRingMetaOffset - kRingCursorsOffset,
              "cursor table exceeds its page");

struct RingSlotMeta {
  std::atomic<uint64_t> gen;
  std::atomic<int64_t> write_time_ns;
  std::atomic<uint64_t> frame_id;
  uint64_t reserved;
};
static_assert(sizeof(RingSlotMeta) == kRingMetaBytes, "slot meta layout changed");

RingControl* ring_control(const Stream& s);
RingCursor* ring_cursor(const Stream& s, uint32_t index);
RingSlotMeta* ring_meta(const Stream& s, uint32_t slot);

// Whether process pid runs (a zombie is dead); with start != 0, also that
// it is the process that started at that time (not a recycled pid).
bool pid_alive(int32_t pid, uint64_t start = 0);
// Start time of process pid (clock ticks since boot), 0 if unknown.
uint64_t pid_start(int32_t pid);

// Room for publication next = max(at, count + 1): every live cursor
// consumed min(next - N, count) (the writer's room check above). A cursor
// whose owner is dead is released here (owner_pid <- 0).
struct RingSpace {
  bool ok = true;
  uint32_t lagging = 0;   // cursor index, when !ok
  uint64_t consumed = 0;  // its consumed count
  int32_t pid = 0;        // its owner
  uint64_t next = 0;      // the publication that has no room
  uint64_t need = 0;      // the count every live cursor must have consumed
};
RingSpace ring_space(const Stream& s, uint64_t at = 0);

// Caller holds the lock; publishes src as max(at, count + 1), skipping the
// counts in between (no room check). Returns the new count.
uint64_t ring_write_locked(Stream& s, const void* src, bool has_frame_id, uint64_t frame_id,
                           uint64_t at = 0);
// Whether publication c (c <= the published count) is known lost without
// copying it: its slot's gen is past 2c (a skipped count, or a slot that a
// later count took).
bool ring_passed(const Stream& s, uint64_t c);

// Cursor table. Caller holds the lock. attach: the cursor named `name`
// (created at the current count, or the one left by an earlier owner), now
// owned by this process; throws kState when a live process owns it or
// every entry is held by a live process.
uint32_t ring_attach(Stream& s, const std::string& name);
// Releases the cursor if this process owns it (no lock needed).
void ring_detach(const Stream& s, uint32_t index);

struct CursorInfo {
  uint32_t index;
  std::string name;
  int32_t owner_pid;
  int32_t last_pid;
  bool alive;
  uint64_t consumed;
  uint64_t missed;
};
std::vector<CursorInfo> ring_cursors(const Stream& s);

// ---- GPU rings ---------------------------------------------------------
// kFlagGpu | kFlagRing (+ kFlagSimDevice for the host backend), N = 2..16:
// the segment holds the header and the ring area above (control, cursors,
// metadata; no slots), the device allocation is a GPU stream's (slots.h)
// plus one device counter per cursor (cursor_counter_offset). Publication
// goes through slot_write_locked (device gen and count, host window), with
// these steps around it:
//
// Writer, publication c, k = c % N, need = c - N (the count slot k holds):
//   meta[k].gen <- 2c - 1 (seq_cst)          -- before the loads below
//   for each named cursor with consumed >= need (seq_cst load): the writer
//   queue waits on the device until its counter >= need
//   (queue_wait_cursor; the host backend polls the counter instead); then
//   the writer's host thread waits for its queue, and releases (CAS owner
//   -> 0, counter <- max(need, consumed)) any cursor whose process died
//   with a copy queued (it never stores its counter)
//   slot_write_locked: device gen odd, copy, gen even, count, wait
//   meta[k].write_time, frame_id ; meta[k].gen <- 2c (release) ; host window
// Reader (cursor consumed L, no lock, never waits for its copy):
//   latest = seq / 2 ; wait while latest <= L ; c = max(L + 1, latest - N + 1)
//   CAS consumed L -> c (seq_cst) ; g = meta[c % N].gen (seq_cst)
//   g == 2c: queue copy slot -> dst, then counter <- c, on the reader's
//            queue (its current CUDA stream): the host returns at once
//   else:    c was overwritten: queue counter <- c alone, missed, go on
// The CAS / gen pair is a Dekker pair with the writer's gen store / loads
// of consumed: either the writer sees the claim (and its queue waits for the
// reader's copy on the device) or the reader sees the slot taken (and does
// not copy). One cursor's reads must stay on one reader queue (counter
// stores are not max operations).
uint64_t device_ring_write_locked(Stream& s, SlotMemory& m, const void* src, bool src_on_device,
                                  bool has_frame_id, uint64_t frame_id);
// One claim by cursor `index` of publication c (consumed was `consumed`):
// kRaced (the CAS failed: another thread of the cursor moved it), kLost (the
// cursor now stands at c, which was overwritten), kQueued (the copy into dst
// and the counter store are queued; *snap describes publication c).
enum class RingClaim { kRaced, kLost, kQueued };
RingClaim device_ring_claim(const Stream& s, SlotMemory& m, uint32_t index, uint64_t consumed,
                            uint64_t c, void* dst, bool dst_on_device, Snapshot* snap);

// The publication c of the ring (c <= the published count): copies it into
// dst and fills *snap; false when slot c % N no longer holds it.
bool ring_copy(const Stream& s, uint64_t c, void* dst, Snapshot* snap);
// A consumer advanced: wake writers blocked for room.
void ring_wake_writers(const Stream& s);

}  // namespace core
}  // namespace torch_shmem
