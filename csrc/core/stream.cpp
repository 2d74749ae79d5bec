// The segment: create, open (validation), unlink and the importer table of
// one stream. See stream.h for the layout, lock.cpp and seqlock.cpp for the
// lock and the publication protocol, docs/design.md for the state machines.
#include "stream.h"

#include "notify.h"
#include "os_handles.h"
#include "ring.h"
#include "slots.h"
#include "stream_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>  // renameat2, RENAME_NOREPLACE
#include <time.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <string>
#include <vector>

namespace torch_shmem {
namespace core {

namespace {

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns a char* that may or may not point into buf.
  const char* s = strerror_r(err, buf, sizeof(buf));
  return std::string(s);
}


uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

// getpid()/gettid() are real system calls (glibc caches neither), and the
// lock path needs both; cache them and refresh in a forked child.
pid_t g_pid = 0;
std::atomic<int> g_fork_generation{0};

namespace {

void on_fork_child() {
  g_pid = getpid();
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

struct PidCache {
  PidCache() {
    g_pid = getpid();
    pthread_atfork(nullptr, nullptr, on_fork_child);
  }
} g_pid_cache;

}  // namespace

timespec to_timespec(double seconds) {
  if (seconds < 0) seconds = 0;
  timespec ts;
  ts.tv_sec = static_cast<time_t>(seconds);
  ts.tv_nsec = static_cast<long>((seconds - ts.tv_sec) * 1e9);
  if (ts.tv_nsec >= 1000000000L) {
    ts.tv_sec += 1;
    ts.tv_nsec -= 1000000000L;
  }
  return ts;
}

int futex_wait(const std::atomic<uint32_t>* addr, uint32_t expected, double seconds) {
  timespec ts = to_timespec(seconds);
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  long rc = syscall(SYS_futex, reinterpret_cast<const uint32_t*>(addr), FUTEX_WAIT,
                    expected, &ts, nullptr, 0);
  return rc == 0 ? 0 : errno;
}

void futex_wake(const std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<const uint32_t*>(addr), FUTEX_WAKE, INT_MAX,
          nullptr, nullptr, 0);
}

uint64_t geometry_checksum(const Header* h) {
  const auto* p = reinterpret_cast<const unsigned char*>(h);
  uint64_t x = 0xCBF29CE484222325ULL;  // FNV-1a 64
  for (size_t i = 8; i < offsetof(Header, geometry_checksum); ++i) {
    x ^= p[i];
    x *= 0x100000001B3ULL;
  }
  return x;
}

void throw_os(const std::string& what, int err) {
  ErrorKind kind = ErrorKind::kOS;
  if (err == ENOENT) kind = ErrorKind::kNotFound;
  if (err == EEXIST) kind = ErrorKind::kExists;
  if (err == EACCES || err == EPERM) kind = ErrorKind::kPermission;
  if (err == ENOSPC || err == ENOMEM) kind = ErrorKind::kNoSpace;
  throw Error(kind, what + ": " + errno_text(err), err);
}

void throw_torn(const std::string& name) {
  throw Error(ErrorKind::kInconsistent,
              "stream '" + name +
                  "' holds an incomplete write (its writer died or aborted mid-write); "
                  "the next completed write repairs it");
}

double now_monotonic() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int64_t now_realtime_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// ---------------------------------------------------------------------------
// HeaderPin: the importer table of a GPU stream (Header::importers)
// ---------------------------------------------------------------------------

std::unique_ptr<HeaderPin> HeaderPin::open(const std::string& name, const uint8_t instance_id[16],
                                           int* why) {
  int unused = 0;
  if (why == nullptr) why = &unused;
  Fd fd(shm_open(Stream::os_name(name).c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd.ok()) {
    *why = errno;
    return nullptr;
  }
  struct stat st;
  Mapping map;
  *why = ESTALE;
  if (fstat(fd.get(), &st) == 0 && static_cast<uint64_t>(st.st_size) >= kHeaderBytes) {
    map = Mapping(kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get());
    if (!map.ok()) *why = errno;
  }
  if (!map.ok()) return nullptr;
  if (std::memcmp(map.as<Header>()->instance_id, instance_id, 16) != 0) {
    *why = ESTALE;  // unlinked and re-created
    return nullptr;
  }
  *why = 0;
  std::unique_ptr<HeaderPin> pin(new HeaderPin());
  pin->h_ = static_cast<Header*>(map.release());
  return pin;
}

HeaderPin::~HeaderPin() {
  if (h_ != nullptr) munmap(h_, kHeaderBytes);
}

// A full table is swept of dead processes' entries (importers that crashed
// never cleared theirs) before giving up.
bool HeaderPin::add_importer(int32_t pid) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (auto& e : h_->importers) {
      int32_t expected = 0;
      if (e.compare_exchange_strong(expected, pid, std::memory_order_seq_cst)) return true;
    }
    if (attempt == 0) live_importer_pids(h_, true);
  }
  return false;
}

void HeaderPin::remove_importer(int32_t pid) {
  for (auto& e : h_->importers) {
    int32_t expected = pid;
    if (e.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) return;
  }
}

int HeaderPin::live_importers() { return static_cast<int>(live_importer_pids(h_, true).size()); }

bool HeaderPin::unlinked() const { return h_->unlinked.load(std::memory_order_seq_cst) != 0; }

// Alive: kill(pid, 0) succeeds, or fails only for lack of permission. A
// recycled pid counts as alive (a free waits longer, never comes early).
std::vector<int32_t> live_importer_pids(Header* h, bool clear_dead) {
  std::vector<int32_t> live;
  // Orders a preceding store of `unlinked` before the loads below (see
  // HeaderPin::unlinked).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (auto& e : h->importers) {
    int32_t pid = e.load(std::memory_order_seq_cst);
    if (pid <= 0) continue;
    if (kill(pid, 0) == 0 || errno == EPERM)
      live.push_back(pid);
    else if (clear_dead)
      e.compare_exchange_strong(pid, 0, std::memory_order_acq_rel);
  }
  return live;
}

std::string sim_device_name(const std::string& name) {
  return std::string(kSimDevicePrefix) + name;
}

std::string Stream::os_name(const std::string& name) {
  if (name.empty()) throw Error(ErrorKind::kValue, "stream name must not be empty");
  if (name.size() > kMaxNameBytes)
    throw Error(ErrorKind::kValue, "stream name is " + std::to_string(name.size()) +
                                       " bytes in UTF-8; the limit is " +
                                       std::to_string(kMaxNameBytes));
  for (unsigned char c : name) {
    if (c == '/')
      throw Error(ErrorKind::kValue, "stream name '" + name + "' must not contain '/'");
    if (c < 0x20 || c == 0x7f)
      throw Error(ErrorKind::kValue, "stream name must not contain control characters");
  }
  return std::string(kOsPrefix) + name;
}

Stream* Stream::create(const std::string& name, const CreateOptions& g) {
  const std::string os = os_name(name);
  check_streaming_copy_setting(name);
  uint32_t itemsize = dtype_itemsize(g.dtype_code);
  if (itemsize == 0) throw Error(ErrorKind::kValue, "unknown dtype code");
  if (g.ndim > kMaxDims)
    throw Error(ErrorKind::kValue, "shape has " + std::to_string(g.ndim) +
                                       " dimensions; the limit is " + std::to_string(kMaxDims));
  uint64_t nbytes = itemsize;
  for (uint32_t i = 0; i < g.ndim; ++i) {
    if (g.shape[i] < 0) throw Error(ErrorKind::kValue, "shape dimensions must be >= 0");
    if (mul_overflows(nbytes, static_cast<uint64_t>(g.shape[i]), &nbytes))
      throw Error(ErrorKind::kValue, "shape is too large");
  }
  if (nbytes > kMaxPayloadBytes) throw Error(ErrorKind::kValue, "payload is too large");
  if (g.flags & ~kKnownFlags) throw Error(ErrorKind::kValue, "unknown flags");
  const bool host_slots = (g.flags & kFlagHostSlots) != 0;
  if (host_slots && (g.flags & (kFlagGpu | kFlagCpuMirror | kFlagSimDevice)))
    throw Error(ErrorKind::kValue, "stream '" + name + "': CPU slots and GPU flags exclude each other");
  const bool slotted = is_slotted(g.flags);
  const bool ring = (g.flags & kFlagRing) != 0;
  // GPU rings (ring.h): the ring area in the segment, the slots on the device.
  const bool device_ring = ring && (g.flags & kFlagGpu);
  if (ring && !host_slots && !device_ring)
    throw Error(ErrorKind::kValue, "stream '" + name + "': a ring is a slotted stream");
  if (device_ring && (g.flags & kFlagCpuMirror))
    throw Error(ErrorKind::kValue, "stream '" + name + "': a GPU ring keeps no CPU mirror");
  const uint32_t max_ring = device_ring ? kMaxSlots : kMaxRingSlots;
  if (ring && (g.nslots < kMinSlots || g.nslots > max_ring))
    throw Error(ErrorKind::kValue, "stream '" + name + "': " + (device_ring ? "GPU " : "") +
                                       "rings need " + std::to_string(kMinSlots) + " to " +
                                       std::to_string(max_ring) + " slots");
  if (ring && g.ring_policy > kRingDropNewest)
    throw Error(ErrorKind::kValue, "stream '" + name + "': unknown ring policy");
  if (slotted != (g.nslots != 0) ||
      (slotted && !ring && (g.nslots < kMinSlots || g.nslots > kMaxSlots)))
    throw Error(ErrorKind::kValue, "stream '" + name + "': slotted streams need " +
                                       std::to_string(kMinSlots) + " to " +
                                       std::to_string(kMaxSlots) + " slots");
  const bool cpu_payload = has_cpu_payload(g.flags);
  const uint64_t slot_stride = round_up(nbytes == 0 ? 1 : nbytes, kSlotAlign);
  // Rings: control, cursors and per-slot metadata before the slots.
  // (slot_stride <= 2**46 and nslots <= 4096: no overflow.)
  const uint64_t device_bytes =
      (ring && host_slots ? ring_slots_base(g.nslots) : kDeviceCountersBytes) +
      slot_stride * g.nslots;
  const uint64_t total =
      kHeaderBytes + (host_slots    ? round_up(device_bytes, 4096)
                      : device_ring ? ring_slots_base(g.nslots)
                      : cpu_payload ? round_up(nbytes, 4096)
                                    : 0);

  Fd fd(shm_open(os.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd.ok()) throw_os("cannot create shared memory '" + os + "'", errno);
  CreatedName created(os);  // removed again if anything below throws
  auto fail = [&](const std::string& what, int err) { throw_os(what, err); };
  // Apply the exact mode regardless of the umask (0600 unless asked).
  if (fchmod(fd.get(), g.mode & 0777) != 0) fail("fchmod", errno);
  // EFBIG here is RLIMIT_FSIZE (ulimit -f): name the stream and the size.
  if (ftruncate(fd.get(), static_cast<off_t>(total)) != 0)
    fail("cannot size shared memory '" + os + "' to " + std::to_string(total) + " bytes", errno);
  // Reserve every page now: on tmpfs a later first touch of an unreserved
  // page beyond the free space would be a SIGBUS in whichever process
  // touched it.
  int err = posix_fallocate(fd.get(), 0, static_cast<off_t>(total));
  if (err != 0) {
    struct statvfs vfs;
    std::string detail;
    if (fstatvfs(fd.get(), &vfs) == 0) {
      detail = " (stream needs " + std::to_string(total) + " bytes, /dev/shm has " +
               std::to_string(static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize) + " free)";
    }
    fail("cannot reserve " + std::to_string(total) + " bytes of shared memory for '" + os + "'" +
             detail,
         err);
  }
  Mapping map(total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get());
  if (!map.ok()) fail("mmap", errno);
  fd.reset();
  void* base = map.get();

  // The pages come from fallocate zero-filled; fill in the header and
  // publish `magic` last so an opener never trusts a half-initialized one.
  Header* h = static_cast<Header*>(base);
  h->layout_version = kLayoutVersion;
  h->header_bytes = static_cast<uint32_t>(kHeaderBytes);
  h->payload_offset = kHeaderBytes;
  h->payload_bytes = nbytes;
  h->segment_bytes = total;
  h->dtype_code = g.dtype_code;
  h->itemsize = itemsize;
  h->ndim = g.ndim;
  h->flags = g.flags;
  h->creator_pid = getpid();
  h->mode = g.mode & 0777;
  h->create_time_ns = now_realtime_ns();
  if (getrandom(h->instance_id, sizeof(h->instance_id), 0) != sizeof(h->instance_id)) {
    // Fall back to time/pid mixing; uniqueness per name is what matters.
    uint64_t a = static_cast<uint64_t>(h->create_time_ns), b = static_cast<uint64_t>(getpid());
    std::memcpy(h->instance_id, &a, 8);
    std::memcpy(h->instance_id + 8, &b, 8);
  }
  for (uint32_t i = 0; i < g.ndim; ++i) h->shape[i] = g.shape[i];
  h->name_len = static_cast<uint32_t>(name.size());
  std::memcpy(h->name, name.data(), name.size());
  if (slotted) {
    h->nslots = g.nslots;
    h->slot_stride = slot_stride;
    h->device_bytes = device_bytes;
    if (ring) h->ring_policy = g.ring_policy;
    if (g.init_device && !host_slots) g.init_device(h);
  }

  int rc = init_stream_mutex(&h->mutex);
  if (rc != 0) throw_os("pthread_mutex_init", rc);
  h->seq.store(0, std::memory_order_relaxed);
  // Last geometry store (init_device above may fill the device fields).
  h->geometry_checksum = geometry_checksum(h);
  h->magic.store(kMagic, std::memory_order_release);

  Stream* s = new Stream();
  map.release();
  created.keep();
  s->name_ = name;
  s->hdr_ = h;
  std::memcpy(s->geo_, base, kGeometryBytes);
  s->payload_ = cpu_payload && !host_slots ? static_cast<uint8_t*>(base) + kHeaderBytes : nullptr;
  s->payload_bytes_ = nbytes;
  s->map_bytes_ = total;
  if (host_slots) s->attach_host_slots(static_cast<uint8_t*>(base) + kHeaderBytes);
  if (device_ring) s->slot_area_ = static_cast<uint8_t*>(base) + kHeaderBytes;
  return s;
}

void Stream::validate(const Header* h, uint64_t file_bytes, const std::string& name) {
  auto bad = [&](const std::string& what) {
    throw Error(ErrorKind::kValue, "shared memory '" + std::string(kOsPrefix) + name +
                                       "' is corrupted or not a torch_shmem stream: " + what);
  };
  if (h->layout_version != kLayoutVersion)
    bad("layout version " + std::to_string(h->layout_version) + ", this build reads " +
        std::to_string(kLayoutVersion));
  if (h->geometry_checksum != geometry_checksum(h)) bad("header checksum mismatch");
  if (h->header_bytes != kHeaderBytes || h->payload_offset != kHeaderBytes)
    bad("unexpected header size");
  uint32_t itemsize = dtype_itemsize(h->dtype_code);
  if (itemsize == 0 || h->itemsize != itemsize)
    bad("invalid dtype code " + std::to_string(h->dtype_code));
  if (h->ndim > kMaxDims) bad("invalid ndim " + std::to_string(h->ndim));
  uint64_t nbytes = itemsize;
  for (uint32_t i = 0; i < h->ndim; ++i) {
    if (h->shape[i] < 0) bad("negative dimension");
    if (mul_overflows(nbytes, static_cast<uint64_t>(h->shape[i]), &nbytes)) bad("shape overflows");
  }
  if (nbytes != h->payload_bytes) bad("shape does not match payload size");
  // Bounded before any rounding: a payload of 2**64 - 2 bytes would round
  // up to 0 pages and "fit" a header-only file (crafted-header defect).
  if (h->payload_bytes > kMaxPayloadBytes) bad("payload is too large");
  if (h->segment_bytes != file_bytes)
    bad("header claims " + std::to_string(h->segment_bytes) + " bytes, segment has " +
        std::to_string(file_bytes));
  if (h->flags & ~kKnownFlags) bad("unknown flags");
  const bool cpu_payload = has_cpu_payload(h->flags);
  const bool host_slots = (h->flags & kFlagHostSlots) != 0;
  if (host_slots && (h->flags & (kFlagGpu | kFlagCpuMirror | kFlagSimDevice)))
    bad("CPU slots together with GPU flags");
  const bool ring = (h->flags & kFlagRing) != 0;
  const bool device_ring = ring && (h->flags & kFlagGpu);
  if (ring && !host_slots && !device_ring) bad("ring flag on an unslotted stream");
  if (device_ring && (h->flags & kFlagCpuMirror)) bad("GPU ring with a CPU mirror");
  if (!ring && (h->ring_policy != 0 || h->ring_reserved != 0)) bad("ring fields on a non-ring stream");
  if (is_slotted(h->flags)) {
    if (h->nslots < kMinSlots || h->nslots > (ring && host_slots ? kMaxRingSlots : kMaxSlots))
      bad("invalid slot count");
    if (h->slot_stride < h->payload_bytes || h->slot_stride % kSlotAlign != 0 ||
        h->slot_stride > kMaxPayloadBytes)
      bad("invalid slot stride");
    if (h->device_bytes != (ring && host_slots ? ring_slots_base(h->nslots) : kDeviceCountersBytes) +
                               h->slot_stride * h->nslots)
      bad("invalid device allocation size");
    if (ring && (h->ring_policy > kRingDropNewest || h->ring_reserved != 0))
      bad("invalid ring policy");
  } else if (h->nslots != 0) {
    bad("slots on a CPU stream");
  }
  // device_bytes is bounded above (stride and nslots are), so no overflow.
  const uint64_t want =
      kHeaderBytes + (host_slots    ? round_up(h->device_bytes, 4096)
                      : device_ring ? ring_slots_base(h->nslots)
                      : cpu_payload ? round_up(h->payload_bytes, 4096)
                                    : 0);
  if (file_bytes != want) bad("payload does not fit the segment");
  if (h->name_len != name.size() || std::memcmp(h->name, name.data(), name.size()) != 0)
    bad("stored name does not match");
}

Stream* Stream::open(const std::string& name, bool readonly) {
  const std::string os = os_name(name);
  check_streaming_copy_setting(name);
  Fd fd(shm_open(os.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd.ok()) {
    int e = errno;
    // A symbolic link (shm_open never follows one) or a directory (glibc
    // reports EISDIR as EINVAL; the name itself was validated above) holds
    // the name: not ours, so ValueError like any foreign file (never an
    // OSError, so one planted link cannot break list_streams() for anyone).
    if (e == ELOOP || e == EISDIR || e == EINVAL)
      throw Error(ErrorKind::kValue, "shared memory '" + os + "' is not a torch_shmem stream (" +
                                         (e == ELOOP ? "a symbolic link" : "a directory") + ")");
    throw_os("cannot open shared memory '" + os + "'", e);
  }
  struct stat st;
  // A creator between shm_open and the publication of `magic` is given a
  // moment; anything still incomplete after that is reported as corrupted.
  const double deadline = now_monotonic() + 1.0;
  uint64_t file_bytes = 0;
  // The immutable part of the header is copied out once and only the copy
  // is validated and used (see geometry()). Only the header page is mapped
  // until then: a foreign or damaged file's size must not decide how much
  // address space we map (a 1 PiB sparse file would make mmap fail).
  alignas(Header) unsigned char geo[sizeof(Header)] = {};
  for (;;) {
    if (fstat(fd.get(), &st) != 0) throw_os("fstat", errno);
    if (!S_ISREG(st.st_mode)) {  // a FIFO, socket or device node under the name
      throw Error(ErrorKind::kValue,
                  "shared memory '" + os + "' is not a torch_shmem stream (not a regular file)");
    }
    file_bytes = static_cast<uint64_t>(st.st_size);
    if (file_bytes >= kHeaderBytes) {
      uint64_t magic;
      {
        Mapping head(kHeaderBytes, PROT_READ, MAP_SHARED, fd.get());
        if (!head.ok()) throw_os("mmap", errno);
        magic = head.as<Header>()->magic.load(std::memory_order_acquire);
        if (magic == kMagic) std::memcpy(geo, head.get(), kGeometryBytes);
      }
      if (magic == kMagic) break;
      if (magic != 0) {
        throw Error(ErrorKind::kValue, "shared memory '" + os +
                                           "' is not a torch_shmem stream (bad magic)");
      }
    }
    // Wait for a creator only while the file is young: a header still
    // missing 2 s after the file last changed was abandoned (its creator
    // died) or is not ours, so a planted file cannot slow each scan of
    // /dev/shm (list_streams, the CLI) by a second.
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    const double age = static_cast<double>(now.tv_sec - st.st_ctim.tv_sec) +
                       (now.tv_nsec - st.st_ctim.tv_nsec) * 1e-9;
    if (now_monotonic() > deadline || age > 2.0) {
      throw Error(ErrorKind::kValue,
                  "shared memory '" + os + "' is not a torch_shmem stream (" +
                      (file_bytes < kHeaderBytes
                           ? "only " + std::to_string(file_bytes) + " bytes"
                           : std::string("header never initialized")) +
                      "); remove it with torch_shmem.unlink(" + "'" + name + "')");
    }
    usleep(1000);
  }
  const Header* g = reinterpret_cast<const Header*>(geo);
  validate(g, file_bytes, name);  // file_bytes is now bounded by the payload limit
  Mapping map(file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get());
  if (!map.ok()) throw_os("mmap", errno);
  fd.reset();
  void* base = map.get();
  Header* h = static_cast<Header*>(base);
  const bool cpu_payload = has_cpu_payload(g->flags);
  const bool host_slots = (g->flags & kFlagHostSlots) != 0;
  if (readonly && cpu_payload && g->payload_bytes > 0) {
    // The header stays writable (waiters and the lock fallback need it);
    // the payload pages (a slotted stream's whole slot area) are mapped
    // read-only for this handle.
    // A ring's control area (cursors included) stays writable: a read-only
    // consumer advances its own cursor there.
    const uint64_t keep = (g->flags & kFlagRing) ? ring_slots_base(g->nslots) : 0;
    if (mprotect(static_cast<uint8_t*>(base) + kHeaderBytes + keep,
                 file_bytes - kHeaderBytes - keep, PROT_READ) != 0)
      throw_os("mprotect", errno);
  }
  Stream* s = new Stream();
  map.release();
  s->name_ = name;
  s->hdr_ = h;
  std::memcpy(s->geo_, geo, kGeometryBytes);
  s->payload_ = cpu_payload && !host_slots ? static_cast<uint8_t*>(base) + kHeaderBytes : nullptr;
  s->payload_bytes_ = g->payload_bytes;
  s->map_bytes_ = file_bytes;
  s->readonly_ = readonly;
  if (host_slots) s->attach_host_slots(static_cast<uint8_t*>(base) + kHeaderBytes);
  if ((g->flags & (kFlagRing | kFlagGpu)) == (kFlagRing | kFlagGpu))
    s->slot_area_ = static_cast<uint8_t*>(base) + kHeaderBytes;
  try {
    s->check_lock_kind();
    if (is_slotted(g->flags) && h->latest_slot.load(std::memory_order_relaxed) >= g->nslots)
      throw Error(ErrorKind::kValue, "shared memory '" + os +
                                         "' is corrupted or not a torch_shmem stream: "
                                         "invalid latest slot");
  } catch (...) {
    delete s;
    throw;
  }
  return s;
}

namespace {

// Flags the generation open on `fd` (its name already removed) `unlinked`,
// then bumps and wakes its epoch: parked readers wake, see the flag and
// end their waits unless a publication they wait for is already there
// (the order wait_slice relies on).
void mark_unlinked(int fd, const std::string& name) {
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < kHeaderBytes) return;
  Mapping map(kHeaderBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
  if (!map.ok()) return;
  Header* h = map.as<Header>();
  if (h->magic.load(std::memory_order_acquire) != kMagic) return;
  if (h->flags & kFlagSimDevice) shm_unlink(sim_device_name(name).c_str());
  h->unlinked.store(1, std::memory_order_release);
  h->epoch.fetch_add(1, std::memory_order_seq_cst);
  futex_wake(&h->epoch);
  signal_armed(h);  // watchers of readiness descriptors learn of it too
}

std::string shm_path(const std::string& os) { return "/dev/shm" + os; }

}  // namespace

Stream::UnlinkIf Stream::unlink_name_if(const std::string& name, const uint8_t instance_id[16]) {
  const std::string os = os_name(name);
  Fd fd(shm_open(os.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd.ok()) {
    int e = errno;
    if (e == ENOENT) return UnlinkIf::kGone;
    throw_os("cannot open shared memory '" + os + "'", e);
  }
  struct stat held;
  if (fstat(fd.get(), &held) != 0) throw_os("cannot stat shared memory '" + os + "'", errno);
  {
    if (static_cast<uint64_t>(held.st_size) < kHeaderBytes) return UnlinkIf::kReplaced;
    Mapping map(kHeaderBytes, PROT_READ, MAP_SHARED, fd.get());
    if (!map.ok()) return UnlinkIf::kReplaced;
    const Header* h = map.as<const Header>();
    if (h->magic.load(std::memory_order_acquire) != kMagic ||
        std::memcmp(h->instance_id, instance_id, 16) != 0)
      return UnlinkIf::kReplaced;
  }
  // Rename the name away (atomic), then check what was taken.
  static std::atomic<uint64_t> serial{0};
  const std::string path = shm_path(os);
  const std::string aside = "/dev/shm/torch_shmem-unlinking." + std::to_string(getpid()) + "." +
                            std::to_string(serial.fetch_add(1));
  if (renameat2(AT_FDCWD, path.c_str(), AT_FDCWD, aside.c_str(), RENAME_NOREPLACE) != 0) {
    int e = errno;
    if (e == ENOENT) return UnlinkIf::kGone;
    throw_os("cannot unlink shared memory '" + os + "'", e);
  }
  struct stat taken;
  if (stat(aside.c_str(), &taken) == 0 &&
      (taken.st_ino != held.st_ino || taken.st_dev != held.st_dev)) {
    // Another process unlinked and re-created the name in between: put the
    // newer generation back. If the name was taken yet again meanwhile,
    // the one set aside has lost its name for good: remove and flag it.
    if (renameat2(AT_FDCWD, aside.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) !=
        0) {
      Fd lost(::open(aside.c_str(), O_RDWR | O_CLOEXEC));
      ::unlink(aside.c_str());
      if (lost.ok()) mark_unlinked(lost.get(), name);
    }
    return UnlinkIf::kReplaced;
  }
  if (::unlink(aside.c_str()) != 0) throw_os("cannot unlink shared memory '" + os + "'", errno);
  mark_unlinked(fd.get(), name);
  return UnlinkIf::kRemoved;
}

bool Stream::unlink_name(const std::string& name) {
  const std::string os = os_name(name);
  // Hold the current generation open, remove the name, and only then flag
  // that generation `unlinked` so that open handles can tell. The flag is
  // set only once the removal succeeded: a user granted write access by
  // mode= but not allowed to remove the file from the sticky /dev/shm
  // cannot mark a live stream unlinked.
  Fd fd(shm_open(os.c_str(), O_RDWR | O_CLOEXEC, 0));
  if (shm_unlink(os.c_str()) != 0) {
    int e = errno;
    if (e == ENOENT) return false;
    throw_os("cannot unlink shared memory '" + os + "'", e);
  }
  if (fd.ok()) mark_unlinked(fd.get(), name);
  return true;
}

Stream::NameState Stream::name_state(const std::string& name, const uint8_t instance_id[16]) {
  const std::string os = os_name(name);
  Fd fd(shm_open(os.c_str(), O_RDONLY | O_CLOEXEC, 0));
  if (!fd.ok()) return errno == ENOENT ? NameState::kGone : NameState::kOther;
  NameState state = NameState::kOther;  // e.g. a creator that has not sized it yet
  struct stat st;
  if (fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) &&
      static_cast<uint64_t>(st.st_size) >= kHeaderBytes) {
    Mapping map(kHeaderBytes, PROT_READ, MAP_SHARED, fd.get());
    if (map.ok()) {
      const Header* h = map.as<const Header>();
      if (h->magic.load(std::memory_order_acquire) == kMagic &&
          std::memcmp(h->instance_id, instance_id, 16) == 0)
        state = NameState::kSame;
    }
  }
  return state;
}

Stream::~Stream() { unmap(); }

void Stream::attach_host_slots(uint8_t* area) {
  const Header* g = geometry();
  slot_area_ = area;
  if (g->flags & kFlagRing) {
    slots_base_ = ring_slots_base(g->nslots);
    host_slots_.reset(HostSlotMemory::over(area, g->device_bytes, g->slot_stride,
                                           g->payload_bytes, kRingMetaOffset, kRingMetaBytes,
                                           slots_base_));
  } else {
    host_slots_.reset(HostSlotMemory::over(area, g->device_bytes, g->slot_stride, g->payload_bytes));
  }
}

SlotMemory* Stream::host_slots() const { return host_slots_.get(); }

void Stream::unmap() {
  if (hdr_ != nullptr) {
    host_slots_.reset();
    munmap(hdr_, map_bytes_);
    hdr_ = nullptr;
    payload_ = nullptr;
    slot_area_ = nullptr;
  }
}

}  // namespace core
}  // namespace torch_shmem
