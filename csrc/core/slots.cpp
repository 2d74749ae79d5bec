// Slotted publication protocol (see slots.h) and its host-memory backend.
#include "slots.h"

#include "os_handles.h"
#include "stream_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace torch_shmem {
namespace core {

namespace {

constexpr int kSlotTries = 4;
constexpr double kOddSpinSeconds = 20e-6;

constexpr uint64_t kSlotReaderHintBytes = 256 * 1024;
constexpr int64_t kSlotReaderLeaseNs = 250 * 1000 * 1000;

std::atomic<uint64_t>* word(uint8_t* base, uint64_t offset) {
  return reinterpret_cast<std::atomic<uint64_t>*>(base + offset);
}

int64_t now_monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Whether readers announce the slot they copy (slots.h, "Reader hints"):
// below the threshold a copy is too short to be overtaken in practice and
// the shared word would cost more than it saves.
bool uses_reader_hints(const Stream& s) {
  const Header* g = s.geometry();
  return (g->flags & (kFlagHostSlots | kFlagRing | kFlagGpu)) == kFlagHostSlots &&
         g->payload_bytes >= kSlotReaderHintBytes;
}

}  // namespace

uint32_t host_slot_for(const Stream& s, uint64_t c) {
  const Header* g = s.geometry();
  const Header* h = s.header();
  const uint32_t n = g->nslots;
  const uint32_t latest = h->latest_slot.load(std::memory_order_relaxed) % n;
  uint32_t k = static_cast<uint32_t>(c % n);
  if (k == latest) k = (k + 1) % n;
  if (n < 3 || !uses_reader_hints(s)) return k;
  int64_t now = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t j = (k + i) % n;
    if (j == latest) continue;
    const int64_t t = h->slot_readers[j].load(std::memory_order_relaxed);
    if (t == 0) return j;
    if (now == 0) now = now_monotonic_ns();
    if (now - t > kSlotReaderLeaseNs) return j;  // a reader that died or stopped mid-copy
  }
  return k;  // every other slot is being copied: overtake one (its reader retries)
}

// ---------------------------------------------------------------------------
// Host backend
// ---------------------------------------------------------------------------

HostSlotMemory* HostSlotMemory::create(const std::string& name, uint64_t bytes, uint32_t mode) {
  const std::string os = sim_device_name(name);
  Fd fd(shm_open(os.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd.ok()) throw_os("cannot create simulated device memory '" + os + "'", errno);
  CreatedName created(os);  // removed again if anything below throws
  if (fchmod(fd.get(), mode & 0777) != 0) throw_os("fchmod", errno);
  if (ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) throw_os("ftruncate", errno);
  int err = posix_fallocate(fd.get(), 0, static_cast<off_t>(bytes));
  if (err != 0) throw_os("cannot reserve simulated device memory", err);
  Mapping map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get());
  if (!map.ok()) throw_os("mmap", errno);
  auto* m = new HostSlotMemory();
  created.keep();
  m->base_ = static_cast<uint8_t*>(map.release());
  m->bytes_ = bytes;
  return m;
}

HostSlotMemory* HostSlotMemory::open(const std::string& name, uint64_t bytes,
                                     const uint8_t instance_id[16]) {
  const std::string os = sim_device_name(name);
  Fd fd(shm_open(os.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd.ok()) throw_os("cannot open simulated device memory '" + os + "'", errno);
  struct stat st;
  if (fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_size) != bytes)
    throw Error(ErrorKind::kValue, "simulated device memory '" + os + "' has the wrong size");
  Mapping map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get());
  if (!map.ok()) throw_os("mmap", errno);
  fd.reset();
  auto* m = new HostSlotMemory();
  m->base_ = static_cast<uint8_t*>(map.release());
  m->bytes_ = bytes;
  m->pin_ = HeaderPin::open(name, instance_id);
  if (m->pin_ != nullptr) {
    if (!m->pin_->add_importer(static_cast<int32_t>(getpid()))) {
      delete m;
      throw Error(ErrorKind::kState, "stream '" + name + "' is already mapped by " +
                                         std::to_string(kMaxImporters) +
                                         " other processes (the limit)");
    }
    m->registered_ = true;
  }
  return m;
}

HostSlotMemory* HostSlotMemory::over(uint8_t* base, uint64_t bytes, uint64_t slot_stride,
                                     uint64_t payload_bytes, uint64_t gen_base,
                                     uint64_t gen_stride, uint64_t slots_base) {
  auto* m = new HostSlotMemory();
  m->gen_base_ = gen_base;
  m->gen_stride_ = gen_stride;
  m->slots_base_ = slots_base;
  m->owns_mapping_ = false;
  m->base_ = base;
  m->bytes_ = bytes;
  m->set_geometry(slot_stride, payload_bytes);
  return m;
}

HostSlotMemory::~HostSlotMemory() {
  if (base_ != nullptr && owns_mapping_) munmap(base_, bytes_);
  if (registered_) pin_->remove_importer(static_cast<int32_t>(getpid()));
}

// gen odd is stored before any slot byte changes (release fence), and the
// slot bytes before gen even (release store): the seqlock writer pattern,
// per slot.
void HostSlotMemory::store_gen(uint32_t slot, uint64_t gen) {
  if (gen & 1) {
    word(base_, gen_at(slot))->store(gen, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
  } else {
    word(base_, gen_at(slot))->store(gen, std::memory_order_release);
  }
}

void HostSlotMemory::copy_in(uint32_t slot, const void* src, bool) {
  publish_copy(base_ + slots_base_ + slot_stride_ * slot, src, payload_bytes_);
}

void HostSlotMemory::store_count(uint64_t count) {
  word(base_, 0)->store(count, std::memory_order_release);
}

void HostSlotMemory::finish_writer() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// The copy happens-before the gen re-load (acquire fence), as in a seqlock
// reader.
uint64_t HostSlotMemory::copy_out_then_gen(uint32_t slot, void* dst, bool) {
  std::memcpy(dst, base_ + slots_base_ + slot_stride_ * slot, payload_bytes_);
  std::atomic_thread_fence(std::memory_order_acquire);
  return word(base_, gen_at(slot))->load(std::memory_order_relaxed);
}

void HostSlotMemory::mirror_out(uint32_t slot, void* host_dst) {
  if (mirror_copier_ && mirror_copier_(slot_ptr(slot), host_dst, payload_bytes_)) return;
  SlotMemory::mirror_out(slot, host_dst);
}

void* HostSlotMemory::slot_ptr(uint32_t slot) {
  return base_ + slots_base_ + slot_stride_ * slot;
}

// Stands in for a device-side wait (cuStreamWaitValue64 on a GPU): polls
// the count word, yielding between polls. The acquire load pairs with the
// writer's release store of count, so the slot's bytes are visible after.
bool HostSlotMemory::queue_wait_count(uint64_t n, double host_timeout) {
  const double deadline = host_timeout < 0 ? INFINITY : now_monotonic() + host_timeout;
  while (load_count() < n) {
    if (now_monotonic() >= deadline) return false;
    sched_yield();
  }
  return true;
}

void HostSlotMemory::park(uint64_t n) {
  std::lock_guard<std::mutex> g(parks_mu_);
  uint64_t& w = parks_[std::this_thread::get_id()];
  w = std::max(w, n);
}

uint64_t HostSlotMemory::unresolved_park() {
  std::lock_guard<std::mutex> g(parks_mu_);
  auto it = parks_.find(std::this_thread::get_id());
  if (it == parks_.end()) return 0;
  if (load_count() >= it->second) {
    parks_.erase(it);
    return 0;
  }
  return it->second;
}

uint64_t HostSlotMemory::load_gen(uint32_t slot) const {
  return word(base_, gen_at(slot))->load(std::memory_order_acquire);
}

uint64_t HostSlotMemory::load_count() const {
  return word(base_, 0)->load(std::memory_order_acquire);
}

void HostSlotMemory::copy_out_then_store_cursor(uint32_t slot, void* dst, bool, uint32_t index,
                                                uint64_t c) {
  if (dst != nullptr) std::memcpy(dst, base_ + slots_base_ + slot_stride_ * slot, payload_bytes_);
  // release: the copy is done before a writer that sees the counter reuses the slot
  word(base_, cursor_counter_offset(index))->store(c, std::memory_order_release);
}

uint64_t HostSlotMemory::load_cursor(uint32_t index) {
  return word(base_, cursor_counter_offset(index))->load(std::memory_order_acquire);
}

void HostSlotMemory::force_cursor(uint32_t index, uint64_t v) {
  word(base_, cursor_counter_offset(index))->store(v, std::memory_order_release);
}

// ---------------------------------------------------------------------------
// Protocol
// ---------------------------------------------------------------------------

uint64_t slot_write_locked(Stream& s, SlotMemory& m, const void* src, bool src_on_device,
                           bool has_frame_id, uint64_t frame_id, SlotWriteSteps* steps,
                           uint64_t at) {
  Header* h = s.header();
  // Slot count and flags from the validated private copy: a damaged shared
  // nslots of 0 would be a division by zero here.
  const Header* g = s.geometry();
  uint64_t c = (h->seq.load(std::memory_order_relaxed) >> 1) + 1;
  // After a failed or dead writer, the device count may be ahead of the
  // host's (it is stored on the device before the host publication): skip
  // past it, so the count that device waiters were released for is never
  // reused for other bytes in the same slot.
  // (GPU streams only: nothing waits on the count word of a CPU stream's
  // slots, so its counts stay exact across a writer that died here.)
  const bool recovered = s.take_recovered();
  if ((g->flags & kFlagGpu) && (recovered || h->broken.load(std::memory_order_acquire)))
    c = std::max(c, m.load_device_count() + 1);
  // A CPU stream carrying another's counts skips to `at` (its readers
  // follow latest_slot and the host seq only, so no slot is marked).
  if (g->flags & kFlagHostSlots) c = std::max(c, at);
  // A CPU stream's slots start rotating after writes in place
  // (Header::slot_contention), which leave the latest publication in any
  // slot: never copy over it (with seq even, a writer killed in that copy
  // would destroy the publication readers are shown), nor over a slot a
  // reader announced (host_slot_for). Its readers follow latest_slot, so
  // no slot order is assumed; a GPU stream's device waits assume slot
  // c % N, which never is the latest there.
  const uint32_t k = (g->flags & kFlagHostSlots) ? host_slot_for(s, c)
                                                 : static_cast<uint32_t>(c % g->nslots);
  bool count_queued = false;
  int64_t t = 0;
  try {
    if (steps != nullptr) steps->before_copy(c, k);
    m.store_gen(k, 2 * c - 1);  // may refuse (before anything is queued)
    m.copy_in(k, src, src_on_device);
    m.store_gen(k, 2 * c);
    count_queued = true;  // from here the device count may reach c
    m.store_count(c);
    m.finish_writer();
    if (steps != nullptr) t = steps->before_publish(c, k);
  } catch (...) {
    if (steps != nullptr) steps->failed(c, k);
    if (count_queued) {
      // The host shows the previous publication, but device waiters may
      // have been released for c: reserve c (seq 2c - 1, broken), so the
      // next write is c + 1. Readers raise InconsistentStreamError until it.
      s.begin_write_locked_at(c);
      s.abort_write_locked();
    }
    throw;
  }
  // Host publication: only now is slot k complete.
  s.begin_write_locked_at(c);
  h->latest_slot.store(k, std::memory_order_relaxed);
  if (g->flags & kFlagCpuMirror) {
    try {
      m.mirror_out(k, s.payload());
    } catch (...) {
      // The mirror may be half copied: readers of it raise
      // InconsistentStreamError until the next completed write, which
      // takes count c + 1 (the device count already is c).
      s.abort_write_locked();
      throw;
    }
  }
  return s.commit_write_locked(has_frame_id, frame_id, t);  // t == 0: now
}

// A snapshot of a kFlagHostSlots stream overlapped a write: from the next
// write on, writes rotate through the slots (Header::slot_contention). The
// header is shared and writable by every handle (waiters, epoch); one store
// per stream generation.
static void note_slot_contention(const Stream& s) {
  if (!(s.geometry()->flags & kFlagHostSlots)) return;
  auto* word = &const_cast<Header*>(s.header())->slot_contention;
  if (word->load(std::memory_order_relaxed) == 0) word->store(1, std::memory_order_relaxed);
}

bool slot_read_fast(const Stream& s, SlotMemory& m, void* dst, bool dst_on_device,
                    Snapshot* snap) {
  const Header* h = s.header();
  const bool hints = uses_reader_hints(s);
  // Shared and writable by every handle, as the wait line (header page).
  auto* readers = const_cast<Header*>(h)->slot_readers;
  double spin_start = -1;
  int tries = 0;
  for (;;) {
    uint64_t s1 = h->seq.load(std::memory_order_acquire);
    if (s1 & 1) {  // host metadata (and mirror) window of a writer
      if (h->broken.load(std::memory_order_acquire)) throw_torn(s.name());
      if (spin_start < 0) note_slot_contention(s);
      double now = now_monotonic();
      if (spin_start < 0) spin_start = now;
      if (now - spin_start > kOddSpinSeconds) return false;
      continue;
    }
    uint32_t k = h->latest_slot.load(std::memory_order_relaxed);
    int64_t t = h->write_time_ns.load(std::memory_order_relaxed);
    uint64_t fid = h->frame_id.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (h->seq.load(std::memory_order_relaxed) != s1) continue;
    if (k >= s.geometry()->nslots) throw Error(ErrorKind::kValue, "corrupted latest slot");
    const uint64_t c = s1 >> 1;
    int64_t token = 0;
    if (hints) {  // announce the copy (slots.h, "Reader hints")
      token = now_monotonic_ns();
      readers[k].store(token, std::memory_order_seq_cst);
    }
    const uint64_t gen = m.copy_out_then_gen(k, dst, dst_on_device);
    if (hints) readers[k].compare_exchange_strong(token, 0, std::memory_order_relaxed);
    if (gen == 2 * c) {
      snap->seq = s1;
      snap->count = c;
      snap->write_time_ns = t;
      snap->frame_id = fid;
      return true;
    }
    note_slot_contention(s);  // the copy was spoiled by a write
    if (++tries >= kSlotTries) return false;
  }
}

Snapshot slot_read_locked(const Stream& s, SlotMemory& m, void* dst, bool dst_on_device) {
  const Header* h = s.header();
  uint64_t s1 = h->seq.load(std::memory_order_acquire);
  if (s1 & 1) throw_torn(s.name());  // no writer can be active while we hold the lock
  uint32_t k = h->latest_slot.load(std::memory_order_relaxed);
  if (k >= s.geometry()->nslots) throw Error(ErrorKind::kValue, "corrupted latest slot");
  const uint64_t c = s1 >> 1;
  if (m.copy_out_then_gen(k, dst, dst_on_device) != 2 * c) throw_torn(s.name());
  Snapshot snap;
  snap.seq = s1;
  snap.count = c;
  snap.write_time_ns = h->write_time_ns.load(std::memory_order_relaxed);
  snap.frame_id = h->frame_id.load(std::memory_order_relaxed);
  return snap;
}

}  // namespace core
}  // namespace torch_shmem
