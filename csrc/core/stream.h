// torch_shmem core: one named shared-memory stream (header + payload in one
// POSIX shm object). Plain C++17, no Python and no torch types, so the NumPy
// binding (csrc/python) and the torch op library (csrc/ops) share it.
//
// Segment layout (one POSIX shm object "/torch_shmem.<name>", mode 0600):
//
//   offset 0      +-------------------------------------------------------+
//                 | identity + geometry (written once by create, before   |
//                 | `magic` is published with release ordering)           |
//   offset 1024   +-------------------------------------------------------+
//                 | publication line: seq (= 2*count, odd while writing), |
//                 | write_time, frame_id, broken, unlinked                |
//                 | (written by the lock holder only)                     |
//   offset 1152   +-------------------------------------------------------+
//                 | lock line: robust process-shared pthread mutex,       |
//                 | owner pid/tid (diagnostics)                           |
//   offset 1280   +-------------------------------------------------------+
//                 | wait line: epoch (futex word), waiters                |
//   offset 4096   +-------------------------------------------------------+
//                 | payload (payload_bytes, page aligned)                 |
//                 +-------------------------------------------------------+
//
// Each hot line is 128 bytes so that the adjacent-line prefetcher does not
// couple them: readers spinning on `seq` do not steal the line holding the
// lock word, and waiters registering in `waiters` do not disturb `seq`.
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtypes.h"
#include "wait_policy.h"

namespace torch_shmem {
namespace core {

constexpr uint64_t kMagic = 0x314D485354484354ULL;  // "TCHTSHM1" little endian
// 2: adds geometry_checksum. Segments of layout 1 are refused with a
// message naming both versions.
constexpr uint32_t kLayoutVersion = 2;
constexpr uint32_t kMaxDims = 32;
constexpr uint32_t kMaxNameBytes = 200;
constexpr uint64_t kHeaderBytes = 4096;
// Largest payload create() accepts; open() refuses headers claiming more (so
// no size computed from a header can wrap around 2**64).
constexpr uint64_t kMaxPayloadBytes = uint64_t(1) << 46;
constexpr const char* kOsPrefix = "/torch_shmem.";
// Simulated device memory of a kFlagSimDevice stream (tests of the slot
// protocol without a GPU). Not listed as a stream.
constexpr const char* kSimDevicePrefix = "/torch_shmem-simdev.";

// Header flags.
constexpr uint32_t kFlagGpu = 1u << 0;        // payload in device slots (slots.h)
constexpr uint32_t kFlagCpuMirror = 1u << 1;  // slotted stream keeps a CPU copy too
constexpr uint32_t kFlagSimDevice = 1u << 2;  // "device" memory is host shm (tests)
constexpr uint32_t kFlagNotify = 1u << 3;     // created with notify=True (informational)
// CPU stream whose payload lives in nslots slots inside the segment, after
// a counters page (the slot protocol of slots.h over the segment itself).
constexpr uint32_t kFlagHostSlots = 1u << 4;
// Ring (with kFlagHostSlots): publications are kept in order for readers
// with named cursors; a ring control area (ring.h) precedes the slots and
// Header::ring_policy says what a write does when a cursor lags a full ring.
constexpr uint32_t kFlagRing = 1u << 5;
constexpr uint32_t kKnownFlags =
    kFlagGpu | kFlagCpuMirror | kFlagSimDevice | kFlagNotify | kFlagHostSlots | kFlagRing;

// Slotted streams: slot count bounds and slot alignment.
constexpr uint32_t kMinSlots = 2;
constexpr uint32_t kMaxSlots = 16;
constexpr uint64_t kSlotAlign = 512;
constexpr uint64_t kDeviceCountersBytes = 4096;
// Processes other than the creator that can map one GPU stream's device
// allocation at a time (Header::importers).
constexpr uint32_t kMaxImporters = 64;

// True when the segment holds a CPU payload after the header (for a
// kFlagHostSlots stream: its slots).
inline bool has_cpu_payload(uint32_t flags) {
  return !(flags & kFlagGpu) || (flags & kFlagCpuMirror);
}
// True for streams published through the slot protocol (slots.h).
inline bool is_slotted(uint32_t flags) { return (flags & (kFlagGpu | kFlagHostSlots)) != 0; }

class SlotMemory;
class HostSlotMemory;

// Readiness descriptors per stream (Header::notify, notify.h).
constexpr uint32_t kMaxNotify = 64;
struct NotifyEntry {
  std::atomic<int32_t> pid;     // owning process, 0 = free
  std::atomic<uint32_t> armed;  // 1: signal it at the next publication
  std::atomic<uint64_t> token;  // names the owner's socket (notify.h)
};
static_assert(sizeof(NotifyEntry) == 16, "notify entry layout changed");

struct alignas(128) Header {
  // ---- identity and geometry: immutable after create --------------------
  std::atomic<uint64_t> magic;  // stored last at create (release)
  uint32_t layout_version;
  uint32_t header_bytes;
  uint64_t payload_offset;
  uint64_t payload_bytes;
  uint64_t segment_bytes;
  uint32_t dtype_code;
  uint32_t itemsize;
  uint32_t ndim;
  uint32_t flags;
  int32_t creator_pid;
  uint32_t mode;
  int64_t create_time_ns;
  uint8_t instance_id[16];
  int64_t shape[kMaxDims];
  uint32_t name_len;
  char name[kMaxNameBytes + 4];
  // Slotted streams only; all zero for single-payload CPU streams. The
  // payload then lives in nslots slots of a device allocation (see
  // slots.h), described here and exported by ipc_handle; never pickled,
  // validated on open. A kFlagHostSlots stream keeps its "device
  // allocation" (counters page + slots, device_bytes) in the segment itself,
  // right after the header.
  uint32_t nslots;
  uint32_t device_index;
  uint64_t slot_stride;
  uint64_t device_bytes;
  uint8_t device_uuid[16];
  uint8_t ipc_handle[64];
  uint8_t reserved_geometry[1024 - 88 - 8 * kMaxDims - 4 - (kMaxNameBytes + 4) - 104 - 8 - 8];
  // kFlagRing streams only (zero otherwise, as in every segment made before
  // rings existed): RingPolicy (ring.h) and a reserved word.
  uint32_t ring_policy;
  uint32_t ring_reserved;
  // FNV-1a 64 of bytes [8, 1016) (everything above except magic), stored
  // before magic. Detects accidental corruption of any immutable field,
  // including those no range check can catch (a same-size dtype swap,
  // creator_pid, mode, instance_id). Not an authenticator: whoever may write
  // the segment is trusted anyway (docs/reliability.md).
  uint64_t geometry_checksum;

  // ---- publication line: written only by the lock holder -----------------
  // seq is odd while a write is in progress and equals 2 * count when
  // stable, so count is exact even if a writer dies mid-write (the next
  // good write takes the odd seq to the next even value). write_time and
  // frame_id are stored inside the odd window, so a reader that sees the
  // same even seq before and after its copy also saw the metadata of that
  // write.
  alignas(128) std::atomic<uint64_t> seq;
  std::atomic<int64_t> write_time_ns;
  std::atomic<uint64_t> frame_id;
  // 1 when a writer died (or aborted) inside the odd window: the payload is
  // torn. Cleared by the next completed write.
  std::atomic<uint32_t> broken;
  std::atomic<uint32_t> unlinked;  // set by unlink(); handles can notice
  std::atomic<uint32_t> latest_slot;  // slotted streams: slot of publication `count`
  // kFlagHostSlots streams other than rings: 0 while writes rotate through
  // the slots; 1 + k once a live view of slot k was handed out (see
  // Stream::pin_live_slot_locked): from then on every write rewrites slot k
  // in place, as a single-payload stream does, so that the view stays the
  // live payload. Written only by the lock holder; zero in older segments.
  std::atomic<uint32_t> live_slot;
  // kFlagHostSlots streams other than rings: 0 until a reader's snapshot
  // overlapped a write (odd seq or a spoiled copy), then 1 for good. Until
  // then writes rewrite the latest slot in place (one payload's cache
  // footprint); from then on they rotate through the slots, so a reader
  // copying the latest publication is not overtaken. Set by readers.
  std::atomic<uint32_t> slot_contention;

  // ---- lock line ----------------------------------------------------------
  alignas(128) pthread_mutex_t mutex;  // robust, process-shared, errorcheck
  // Written only by the thread holding the mutex. owner_pid/owner_tid are
  // for diagnostics and, together with the tid the kernel keeps in the
  // futex word, tell a thread that it already holds the lock; owner_depth is
  // the re-entrancy depth. Keeping them here (not in thread-local storage)
  // lets every handle and every library in the process share one depth.
  std::atomic<int32_t> owner_pid;
  std::atomic<int32_t> owner_tid;
  std::atomic<int32_t> owner_depth;

  // ---- wait line ----------------------------------------------------------
  // epoch is the futex word: bumped after every publication. waiters counts
  // parked readers so that the write path makes no syscall when nobody waits.
  alignas(128) std::atomic<uint32_t> epoch;
  std::atomic<uint32_t> waiters;
  // Readiness descriptors armed in `notify` (notify.h): like waiters, lets
  // the write path skip the table (and make no system call) when nobody
  // watches a descriptor. Zero in segments written before it existed.
  std::atomic<uint32_t> armed_readers;

  // ---- device importers (GPU streams) ------------------------------------
  // pids of the processes other than the creator that map the device
  // allocation, 0 = free entry. The creator frees the allocation after
  // unlink only once none of them is alive: freeing memory another process
  // still maps would hand that process someone else's data. An importer
  // clears its entry when it unmaps; a dead one's entry is ignored.
  alignas(128) std::atomic<int32_t> importers[kMaxImporters];

  // ---- readiness descriptors (notify.h) ----------------------------------
  // One entry per handle that asked for fileno(): its process, whether it
  // wants a signal for the next publication, and the token naming its
  // socket. All zero in a new segment (and in segments made before this
  // table existed, whose header page was zero-filled past `importers`).
  alignas(128) NotifyEntry notify[kMaxNotify];

  // ---- slot readers (kFlagHostSlots streams other than rings) -------------
  // Advisory: slot_readers[k] is the CLOCK_MONOTONIC time (ns) at which a
  // reader began copying slot k, 0 when none is (slots.h, "Reader hints").
  // Zero in segments made before it existed (no reader announced).
  alignas(128) std::atomic<int64_t> slot_readers[kMaxSlots];
};

static_assert(offsetof(Header, geometry_checksum) == 1016, "header layout changed");
static_assert(offsetof(Header, ring_policy) == 1008, "header layout changed");
static_assert(offsetof(Header, seq) == 1024, "header layout changed");
static_assert(offsetof(Header, live_slot) == 1060, "header layout changed");
static_assert(offsetof(Header, slot_contention) == 1064, "header layout changed");
static_assert(offsetof(Header, mutex) == 1152, "header layout changed");
static_assert(offsetof(Header, epoch) == 1280, "header layout changed");
static_assert(offsetof(Header, importers) == 1408, "header layout changed");
static_assert(offsetof(Header, armed_readers) == 1288, "header layout changed");
static_assert(offsetof(Header, notify) == 1664, "header layout changed");
static_assert(offsetof(Header, slot_readers) == 2688, "header layout changed");
static_assert(sizeof(Header) <= kHeaderBytes, "header exceeds its page");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "need lock-free 64-bit atomics");
static_assert(sizeof(std::atomic<uint32_t>) == 4, "futex word must be 32 bits");

// Error kinds, mapped to Python exceptions at one choke point in the binding.
enum class ErrorKind {
  kValue,         // ValueError: bad argument, foreign or corrupted segment
  kNotFound,      // FileNotFoundError
  kExists,        // FileExistsError
  kPermission,    // PermissionError
  kTimeout,       // TimeoutError
  kInconsistent,  // InconsistentStreamError: torn payload after a writer died
  kState,         // RuntimeError: wrong usage (e.g. release without acquire)
  kNoSpace,       // OSError(ENOSPC)
  kOS,            // OSError(errno)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg, int err = 0)
      : std::runtime_error(msg), kind_(kind), errno_(err) {}
  ErrorKind kind() const { return kind_; }
  int err() const { return errno_; }

 private:
  ErrorKind kind_;
  int errno_;
};

// What create() is given: the stream's geometry and access mode, and for
// slotted streams the slot count and the hook that allocates their memory.
struct CreateOptions {
  uint32_t dtype_code = 0;
  uint32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  uint32_t flags = 0;
  uint32_t mode = 0600;
  uint32_t nslots = 0;  // > 0 with kFlagGpu or kFlagHostSlots: slotted stream
  uint32_t ring_policy = 0;  // kFlagRing: RingPolicy (ring.h)
  // Called after the header geometry is filled in and before `magic` is
  // published: allocates the device memory and records its handle. If it
  // throws, the segment is removed.
  std::function<void(Header*)> init_device;
};

struct Snapshot {
  uint64_t seq = 0;
  uint64_t count = 0;
  int64_t write_time_ns = 0;
  uint64_t frame_id = 0;
};

// A mapping of one stream. Thread-safety: the lock/publish/snapshot/wait
// methods may run concurrently from any number of threads and processes;
// unmap() must only run when no other method is in flight on this object
// (the binding guarantees it with an in-flight counter).
//
// Blocking is done in bounded slices (lock_for, wait_slice); Session
// (session.h) loops over them up to a deadline and calls the binding's
// hook between slices (signals, close() requests).
class Stream {
 public:
  // Creates a new stream; throws kExists when the name is taken, kNoSpace
  // when /dev/shm cannot hold it (pages are reserved up front, so a full
  // tmpfs fails here and never with SIGBUS later).
  static Stream* create(const std::string& name, const CreateOptions& g);
  // Opens an existing stream; throws kNotFound, kPermission, kValue
  // (foreign, truncated or corrupted segment).
  static Stream* open(const std::string& name, bool readonly);
  // Removes the name; returns false when it did not exist. Then flags the
  // removed generation `unlinked` and wakes its parked readers (see
  // wait_slice).
  static bool unlink_name(const std::string& name);
  // Removes the name only if it still holds generation `instance_id`
  // (kRemoved; then as unlink_name), else leaves it alone: kGone when
  // nothing is there, kReplaced when another generation is (re-created
  // since). The check and the removal cannot be split by another process's
  // unlink and re-create: the name is first renamed away atomically, and
  // what was renamed is compared (inode) with the generation checked; a
  // newer generation taken by mistake is renamed back.
  enum class UnlinkIf { kRemoved, kGone, kReplaced };
  static UnlinkIf unlink_name_if(const std::string& name, const uint8_t instance_id[16]);
  // What the name holds now, compared with the generation `instance_id`:
  // nothing, that generation, or another one (also a file still being
  // created, or one this process may not open). A few system calls, no
  // validation: for error messages, not for opening.
  enum class NameState { kGone, kSame, kOther };
  static NameState name_state(const std::string& name, const uint8_t instance_id[16]);
  // Validates a user-visible name (throws kValue) and returns the OS name.
  static std::string os_name(const std::string& name);

  ~Stream();
  void unmap();

  const Header* header() const { return hdr_; }
  Header* header() { return hdr_; }
  // This process's private copy of the immutable part of the header
  // (identity and geometry, bytes [0, 1024)), taken and validated once at
  // open/create. Read sizes, shape, dtype and flags from here, never from
  // header(): another process that may write the segment can change the
  // shared bytes after validation, and a size re-read from shared memory
  // could then drive a copy out of bounds.
  const Header* geometry() const { return reinterpret_cast<const Header*>(geo_); }
  const std::string& name() const { return name_; }
  // CPU payload; nullptr if none. For a kFlagHostSlots stream: the slot of
  // the latest publication (or of the in-place write in progress), which is
  // stable only while the lock is held.
  uint8_t* payload() const {
    if (slot_area_ == nullptr || hdr_ == nullptr) return payload_;
    const Header* g = geometry();
    const uint32_t k = hdr_->latest_slot.load(std::memory_order_relaxed) % g->nslots;
    return slot_area_ + slots_base_ + g->slot_stride * k;
  }
  // The slot memory of a kFlagHostSlots stream (its own segment), nullptr
  // for other streams. Session uses it when the binding gives no other.
  SlotMemory* host_slots() const;
  // kFlagHostSlots: the slot area (segment offset 4096), nullptr otherwise.
  uint8_t* slot_area() const { return slot_area_; }
  uint64_t payload_bytes() const { return payload_bytes_; }
  bool readonly() const { return readonly_; }
  bool mapped() const { return hdr_ != nullptr; }

  // ---- lock: re-entrant per thread, robust to owner death ----------------
  // Tries for at most `seconds` (<= 0: one try). Returns true when this
  // thread holds the lock afterwards.
  bool lock_for(double seconds);
  void unlock();
  int held_depth() const;  // this thread's depth on this stream (any handle)
  bool held_by_this_thread() const;
  // True once after lock_for took the lock over from a dead owner (the
  // flag is cleared by this call): the dead writer may have queued device
  // work that the host header does not show.
  bool take_recovered() {
    bool r = recovered_;
    recovered_ = false;
    return r;
  }

  // ---- publication (caller holds the lock) ------------------------------
  // count += 1 per completed write; seq = 2 * count (+1 while writing).
  // With `at` past count + 1 the write publishes count `at`, skipping the
  // counts in between (readers count them as missed: a stream carrying
  // another's counts, the bridge); otherwise count + 1.
  uint64_t write_locked(const void* src, bool has_frame_id, uint64_t frame_id, uint64_t at = 0);
  uint64_t clear_locked();
  // Two-phase write for in-place producers. With `at` > 0 the write will
  // publish count `at` instead of count + 1 (kState unless at > count):
  // a bridge carries the source's counts into its local stream this way,
  // so that readers' missed-publication counts stay exact across the link.
  // Slotted streams: the next slot first receives the latest publication
  // (an in-place producer may edit part of it) unless `whole` says the
  // caller overwrites every byte.
  void begin_write_locked(uint64_t at = 0, bool whole = false);
  // Slotted streams: opens the host window of publication c (seq = 2c - 1).
  // c is count + 1 except after a slotted write that failed once its device
  // count may already have reached c (see slot_write_locked): then c skips
  // past it. c must exceed count.
  void begin_write_locked_at(uint64_t c);
  // write_time_ns 0: now (a ring passes the time it stored in the slot).
  uint64_t commit_write_locked(bool has_frame_id, uint64_t frame_id, int64_t write_time_ns = 0);
  void abort_write_locked();  // leaves the stream broken until the next write
  // Slotted CPU streams (not rings): a live view of the latest slot is
  // being handed out (read(safe=False)); pins that slot, so that later
  // writes rewrite it in place (through the in-place window, seq odd for the
  // whole copy) instead of rotating, and the view keeps showing the latest
  // publication. Permanent for this generation of the stream. No-op for
  // other streams. Caller holds the lock.
  void pin_live_slot_locked();
  // The pinned slot + 1, or 0 (see Header::live_slot).
  uint32_t live_slot() const {
    return host_slots_ ? hdr_->live_slot.load(std::memory_order_relaxed) : 0;
  }
  // kFlagHostSlots: whether writes go to the next slot (true) or rewrite the
  // latest (pinned) slot in place (see Header::slot_contention).
  bool rotates_slots() const {
    return host_slots_ && live_slot() == 0 &&
           hdr_->slot_contention.load(std::memory_order_relaxed) != 0;
  }

  // ---- snapshot ---------------------------------------------------------
  // Lock-free attempt; false means "take the lock and use read_locked".
  // Throws kInconsistent when the last write was torn by a dead writer.
  bool read_fast(void* dst, Snapshot* snap) const;
  Snapshot read_locked(void* dst) const;  // caller holds the lock

  // ---- waiting ------------------------------------------------------------
  // Spins for up to spin_seconds, then parks on the futex for at most
  // `seconds`. Returns true when count > after. May return false early
  // (spurious wake, wake_all, signal); callers loop.
  //
  // With `gone` given, an unlinked stream ends the wait: when the
  // generation is flagged unlinked (before the slice or by the wake that
  // unlink_name sends) and count <= after, it returns false at once with
  // *gone = true instead of parking; no new opener can publish to a removed
  // name, so such a wait would only end by its timeout. A publication that
  // is already there (a handle that still writes after the unlink) is
  // returned as usual. Without `gone` the flag is ignored.
  bool wait_slice(uint64_t after, double spin_seconds, double seconds,
                  bool* gone = nullptr) const;
  bool unlinked() const { return hdr_->unlinked.load(std::memory_order_acquire) != 0; }
  void wake_all() const;
  // The latest publication's count and write time (realtime ns), read
  // consistently; false while a write is in progress.
  bool latest_publication(uint64_t* count, int64_t* write_time_ns) const;
  // Publication gaps seen through this mapping (wait_policy.h): whether a
  // wait spins before parking.
  GapEstimator& gaps() const { return gaps_; }

  uint64_t seq() const { return hdr_->seq.load(std::memory_order_acquire); }
  uint64_t count() const { return seq() >> 1; }

 private:
  Stream() = default;
  void begin_locked();
  uint64_t publish_locked(bool has_frame_id, uint64_t frame_id, int64_t write_time_ns = 0);
  // Throws kState for a GPU stream when writing (slots are written through a
  // device attachment) or when it has no CPU payload to read.
  void require_cpu_payload(bool writing) const;
  static void validate(const Header* h, uint64_t file_bytes, const std::string& name);
  // Throws kValue unless the shared mutex still has the kind create() gave
  // it: glibc aborts (assert) or misbehaves on other kinds.
  void check_lock_kind() const;

  // kFlagHostSlots: the slot area (counters page + slots) and its backend.
  void attach_host_slots(uint8_t* area);

  std::string name_;
  Header* hdr_ = nullptr;
  uint8_t* payload_ = nullptr;
  uint8_t* slot_area_ = nullptr;
  uint64_t slots_base_ = kDeviceCountersBytes;  // slot 0, from slot_area_ (rings: ring.h)
  std::unique_ptr<HostSlotMemory> host_slots_;
  uint64_t payload_bytes_ = 0;
  size_t map_bytes_ = 0;
  bool readonly_ = false;
  bool recovered_ = false;  // see take_recovered()
  mutable GapEstimator gaps_;  // see gaps()
  alignas(Header) unsigned char geo_[sizeof(Header)] = {};  // see geometry()
};

// A private read-write mapping of one stream's header page, for objects
// that outlive the stream's handles (a GPU allocation and its importer
// entry). Keeps the segment alive after unlink, like any mapping.
class HeaderPin {
 public:
  // nullptr when the segment cannot be mapped writable (*why = EACCES or
  // EPERM: no permission) or the name no longer holds the stream with this
  // instance id (*why = ENOENT or ESTALE: unlinked, maybe re-created).
  static std::unique_ptr<HeaderPin> open(const std::string& name, const uint8_t instance_id[16],
                                         int* why = nullptr);
  ~HeaderPin();
  HeaderPin(const HeaderPin&) = delete;
  HeaderPin& operator=(const HeaderPin&) = delete;

  // Records pid in a free entry, clearing dead processes' entries if the
  // table is full; false when kMaxImporters live processes hold entries.
  bool add_importer(int32_t pid);
  void remove_importer(int32_t pid);
  // Number of entries whose process is alive; clears those of dead ones.
  int live_importers();
  // The stream's unlinked flag (set by unlink_name once the name is gone).
  // An importer checks it after add_importer, the creator checks importers
  // after unlinking: with both orders sequentially consistent, an importer
  // that registers too late sees the flag and backs out.
  bool unlinked() const;
  // The pinned header page (read-write).
  Header* header() const { return h_; }

 private:
  HeaderPin() = default;
  Header* h_ = nullptr;
};

// The live entries of h's importer table (Header::importers); with
// clear_dead, the entries of dead processes are also cleared (the header
// must then be mapped writable).
std::vector<int32_t> live_importer_pids(Header* h, bool clear_dead);

// FNV-1a 64 over header bytes [8, 1016); see Header::geometry_checksum.
uint64_t geometry_checksum(const Header* h);

int64_t now_realtime_ns();
double now_monotonic();
std::string sim_device_name(const std::string& name);
// Throws kInconsistent: the payload of stream `name` is torn (its writer
// died or aborted inside the odd window).
[[noreturn]] void throw_torn(const std::string& name);
// Throws Error with the kind that matches errno `err` (ENOENT -> kNotFound...).
[[noreturn]] void throw_os(const std::string& what, int err);

}  // namespace core
}  // namespace torch_shmem
