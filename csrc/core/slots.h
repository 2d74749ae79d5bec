// Slotted publication: the protocol of GPU streams, written once for any
// memory backend (CUDA device memory in csrc/cuda, host shared memory for
// tests of the protocol on machines without a GPU).
//
// Device allocation layout (device_bytes = 4096 + nslots * slot_stride):
//
//   offset 0               count (u64): latest published count, for
//                          device-side waits (consumer stream waits until
//                          count >= n)
//   offset 128 * (1 + k)   gen[k] (u64), k < 16: generation of slot k;
//                          odd while being written, 2 * c once it holds
//                          publication c
//   offset 4096            slot 0, slot 1, ... (slot_stride apart, 512 B
//                          aligned); publication c lives in slot c % nslots
//
// Writer (holds the stream's CPU lock), publication c = count + 1, k = c % N:
//   device queue:  gen[k] <- 2c - 1 ; copy src -> slot k ; gen[k] <- 2c ;
//                  count <- c ; wait for the queue (an event, not the device)
//   host:          seq odd ; latest_slot <- k ; [mirror: slot k -> CPU
//                  payload] ; write_time, frame_id ; seq even ; wake waiters
// The host publishes c only after slot k is complete, so a reader that
// follows the host header never looks at a slot being written. A writer
// that dies before its host publication leaves the stream untouched (the
// torn slot is not the latest); the next writer rewrites the same slot.
//
// Reader (no lock):
//   host:   s1 <- seq (even) ; k <- latest_slot ; write_time, frame_id ;
//           s2 <- seq ; retry unless s1 == s2 ; c = s1 / 2
//   device: copy slot k -> dst ; then g <- gen[k] (after the copy completes)
//   g == 2c: dst is exactly publication c. Otherwise the writer lapped the
//   ring (N - 1 more publications) and began rewriting slot k during the
//   copy: retry, and after a few failures take the lock.
// gen[k] only grows, so checking it once after the copy suffices: it was
// 2c when the host published c, and any rewrite raises it before touching
// the slot's bytes.
//
// Reader hints (kFlagHostSlots streams other than rings, payloads of at
// least kSlotReaderHintBytes): a reader stores the time it starts copying
// slot k in Header::slot_readers[k] and clears it (CAS of its own value)
// after the copy; a rotating writer takes the first slot from c % N on that
// is neither the latest nor announced (an announcement older than
// kSlotReaderLeaseNs counts as gone: a reader that died or stopped
// mid-copy). With N >= 3 a reader copying one slot then never has it
// rewritten under it, however slow its copy: the writer alternates between
// the other two. The hints are advisory: a race (a writer that chose slot
// k just before the announcement, two readers of one slot sharing a word,
// every other slot announced) costs a spoiled copy and a retry, never a
// torn read, since the generation check above decides.
#pragma once

#include <stdint.h>

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "stream.h"

namespace torch_shmem {
namespace core {

inline uint64_t gen_offset(uint32_t slot) { return 128 * (uint64_t(1) + slot); }
// GPU rings (ring.h): the device counter of cursor i, in the allocation's
// counter page after the last generation word (up to 32 cursors).
constexpr uint64_t kCursorCountersOffset = 128 * (1 + kMaxSlots + 1);
inline uint64_t cursor_counter_offset(uint32_t index) {
  return kCursorCountersOffset + 8 * uint64_t(index);
}
static_assert(kCursorCountersOffset + 8 * 32 <= kDeviceCountersBytes,
              "cursor counters exceed the counter page");
inline uint64_t slot_offset(const Header* h, uint32_t slot) {
  return kDeviceCountersBytes + h->slot_stride * slot;
}

// Memory backend of a slotted stream. "Writer queue" and "reader queue"
// are the backend's ordered work queues (CUDA streams on a GPU; immediate
// execution on the host).
class SlotMemory {
 public:
  virtual ~SlotMemory() = default;
  // Writer queue, in order.
  virtual void store_gen(uint32_t slot, uint64_t gen) = 0;
  virtual void copy_in(uint32_t slot, const void* src, bool src_on_device) = 0;
  virtual void store_count(uint64_t count) = 0;
  // Blocks until every queued writer operation is complete and visible.
  virtual void finish_writer() = 0;
  // Reader queue: copy slot -> dst, then return gen[slot] read after the
  // copy completed.
  virtual uint64_t copy_out_then_gen(uint32_t slot, void* dst, bool dst_on_device) = 0;
  // Writer, inside the host window: copy the complete slot into the CPU
  // mirror (host memory) and wait for it. On a GPU the mirror pages are
  // page-locked once per mapping (cudaHostRegister), so this is one DMA.
  virtual void mirror_out(uint32_t slot, void* host_dst) { (void)copy_out_then_gen(slot, host_dst, false); }
  // Address of a slot in this process (device pointer on a GPU).
  virtual void* slot_ptr(uint32_t slot) = 0;
  // Device-side wait: work queued on the reader queue after this call
  // starts only once the device count is >= n, i.e. publication n is
  // complete in slot n % nslots (the writer stores count after the slot's
  // copy, in its queue's order). On a GPU the host thread does not block
  // (the consumer's CUDA stream waits) and host_timeout is ignored; the
  // host backend blocks the calling thread up to host_timeout seconds
  // (< 0: forever) and returns false on timeout.
  virtual bool queue_wait_count(uint64_t n, double host_timeout) = 0;
  // The device count (offset 0) as it is now, read without going through
  // the caller's queues (on a GPU: a private stream; never blocks behind a
  // parked or busy CUDA stream).
  virtual uint64_t load_device_count() = 0;
  // The calling reader queue's unresolved device wait on this allocation:
  // the count n of an earlier park (wait_device) that the device count has
  // not reached yet, or 0. A host-synchronous read queued behind such a
  // wait would block until publication n, so the binding first waits for n
  // on the host (interruptible, with the caller's timeout, never holding
  // the stream lock). Throws kState when the queue is parked on another
  // allocation's unpublished count (nothing this stream's writers do can
  // release it).
  virtual uint64_t unresolved_park() { return 0; }
  // Reader queue: wait_device without blocking the host. On a GPU this is
  // queue_wait_count; the host backend records it for the calling thread,
  // which stands for the reader queue (unresolved_park reports it).
  virtual void park(uint64_t n) { (void)queue_wait_count(n, -1); }

  // ---- GPU rings (ring.h): one device counter per cursor --------------
  // Reader queue: copy slot -> dst (no copy when dst is null), then
  // counter[index] <- c; the host does not wait (on a GPU the copy and the
  // store run on the caller's CUDA stream; the host backend runs both at
  // once).
  virtual void copy_out_then_store_cursor(uint32_t slot, void* dst, bool dst_on_device,
                                          uint32_t index, uint64_t c) = 0;
  // Writer queue: work queued after this starts once counter[index] >= n.
  // Returns false when the backend has no device-side wait (the host
  // backend): the caller then polls load_cursor itself.
  virtual bool queue_wait_cursor(uint32_t index, uint64_t n) = 0;
  // counter[index] now, through a private queue (never behind the caller's).
  virtual uint64_t load_cursor(uint32_t index) = 0;
  // counter[index] <- v now, through a private queue: a new owner's start,
  // or the release of a writer queue waiting on a reader that died.
  virtual void force_cursor(uint32_t index, uint64_t v) = 0;
  // finish_writer, calling every_slice about every 100 ms while the writer
  // queue is not done (a GPU ring's writer releases dead readers there).
  virtual void finish_writer_while(const std::function<void()>& every_slice) {
    (void)every_slice;
    finish_writer();
  }
};

// Host shared-memory backend: the "device allocation" is a second POSIX shm
// object (kSimDevicePrefix + name). Exercises the protocol across processes
// on machines without a GPU.
class HostSlotMemory : public SlotMemory {
 public:
  // Creates (and zero-fills) or opens the simulated allocation. open()
  // records this process in the stream's importer table while it maps the
  // memory, as the CUDA backend does for an imported allocation.
  static HostSlotMemory* create(const std::string& name, uint64_t bytes, uint32_t mode);
  static HostSlotMemory* open(const std::string& name, uint64_t bytes,
                              const uint8_t instance_id[16]);
  // The slot area of a kFlagHostSlots stream: `bytes` at `base`, inside the
  // stream's own mapping (not owned, never unmapped here).
  // gen[k] lives at gen_base + gen_stride * k and slot k at slots_base +
  // slot_stride * k (defaults: the layout above; rings: ring.h).
  static HostSlotMemory* over(uint8_t* base, uint64_t bytes, uint64_t slot_stride,
                              uint64_t payload_bytes, uint64_t gen_base = 128,
                              uint64_t gen_stride = 128,
                              uint64_t slots_base = kDeviceCountersBytes);
  ~HostSlotMemory() override;

  void store_gen(uint32_t slot, uint64_t gen) override;
  void copy_in(uint32_t slot, const void* src, bool src_on_device) override;
  void store_count(uint64_t count) override;
  void finish_writer() override;
  uint64_t copy_out_then_gen(uint32_t slot, void* dst, bool dst_on_device) override;
  void* slot_ptr(uint32_t slot) override;
  bool queue_wait_count(uint64_t n, double host_timeout) override;
  uint64_t load_device_count() override { return load_count(); }
  uint64_t unresolved_park() override;
  void park(uint64_t n) override;

  uint64_t load_gen(uint32_t slot) const;
  uint64_t load_count() const;

  void copy_out_then_store_cursor(uint32_t slot, void* dst, bool dst_on_device, uint32_t index,
                                  uint64_t c) override;
  bool queue_wait_cursor(uint32_t, uint64_t) override { return false; }
  uint64_t load_cursor(uint32_t index) override;
  void force_cursor(uint32_t index, uint64_t v) override;

  void mirror_out(uint32_t slot, void* host_dst) override;
  // Copier for mirror_out (src slot, dst, bytes; false: not done, the
  // backend copies itself). The torch ops set it so that simulated streams
  // mirror through shmem::mirror_copy, as CUDA ones do.
  void set_mirror_copier(std::function<bool(void*, void*, uint64_t)> f) {
    mirror_copier_ = std::move(f);
  }

  void set_geometry(uint64_t slot_stride, uint64_t payload_bytes) {
    slot_stride_ = slot_stride;
    payload_bytes_ = payload_bytes;
  }

 private:
  HostSlotMemory() = default;
  std::unique_ptr<HeaderPin> pin_;  // importer entry (open() only)
  bool registered_ = false;
  bool owns_mapping_ = true;
  uint8_t* base_ = nullptr;
  uint64_t bytes_ = 0;
  uint64_t slot_stride_ = 0;
  uint64_t payload_bytes_ = 0;
  uint64_t gen_base_ = 128;
  uint64_t gen_stride_ = 128;
  uint64_t slots_base_ = kDeviceCountersBytes;
  uint64_t gen_at(uint32_t slot) const { return gen_base_ + gen_stride_ * slot; }
  std::function<bool(void*, void*, uint64_t)> mirror_copier_;
  std::mutex parks_mu_;
  std::map<std::thread::id, uint64_t> parks_;  // park(): per calling thread
};

// What a caller adds to slot_write_locked (GPU rings, ring.h), for the
// publication c into slot k: before_copy, before anything is queued;
// before_publish, once slot k is complete and before the host publication
// (returns its write time, ns since the epoch); failed, when the write
// throws (before the throw goes on).
struct SlotWriteSteps {
  virtual ~SlotWriteSteps() = default;
  virtual void before_copy(uint64_t c, uint32_t k) = 0;
  virtual int64_t before_publish(uint64_t c, uint32_t k) = 0;
  virtual void failed(uint64_t c, uint32_t k) = 0;
};

// The slot a kFlagHostSlots stream's publication c goes to when writes
// rotate: from c % N on, the first that is neither the latest nor announced
// by a reader (see "Reader hints" above). Caller holds the lock.
uint32_t host_slot_for(const Stream& s, uint64_t c);

// Protocol entry points. The stream must be slotted (kFlagGpu or
// kFlagHostSlots).
// Caller holds the lock. Returns the new count. A failure once the device
// count may have been queued leaves the stream broken with the count
// reserved, so the next write takes the count after it (device waiters
// released for the failed count never see their slot rewritten as the
// same count).
// `at` (kFlagHostSlots streams only): publish count `at` when it is past
// count + 1, skipping the counts in between (Stream::write_locked).
uint64_t slot_write_locked(Stream& s, SlotMemory& m, const void* src, bool src_on_device,
                           bool has_frame_id, uint64_t frame_id, SlotWriteSteps* steps = nullptr,
                           uint64_t at = 0);
// Lock-free attempt; false means "take the lock and use slot_read_locked".
bool slot_read_fast(const Stream& s, SlotMemory& m, void* dst, bool dst_on_device,
                    Snapshot* snap);
// Caller holds the lock.
Snapshot slot_read_locked(const Stream& s, SlotMemory& m, void* dst, bool dst_on_device);

}  // namespace core
}  // namespace torch_shmem
