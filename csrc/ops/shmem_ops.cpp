// torch.ops.shmem: streams as PyTorch custom ops.
//
// One TORCH_LIBRARY block holds every schema (CPU and, from csrc/cuda, CUDA
// implementations register behind the same schemas).
//
// A stream is named inside an op by a *stream token*: a private int64[4] CPU
// tensor [handle_id, instance_lo, instance_hi, last_count] returned by the
// control ops create/open. handle_id keys a process-local registry of mapped
// streams; instance_lo/hi (the stream generation) guard against a stale or
// forged token; last_count is the count of the publication this token last
// published or read. Every data op declares the token as mutated
// (`Tensor(a!) stream`) and really writes last_count, so:
//   * torch.compile never drops, reorders or de-duplicates two data ops on
//     the same token (each depends on the token version the previous one
//     produced);
//   * functionalization may clone the token and copy it back: harmless,
//     because the token is private memory and the op finds the stream
//     through the registry, never through the token's address.
// Control ops (create/open/close/unlink) are for eager code; the Python
// wrappers keep them out of compiled regions.
#include <Python.h>
#include <execinfo.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../core/ring.h"
#include "../core/session.h"
#include "../core/slots.h"
#include "../core/stream.h"
#include "entry.h"
#include "gpu_backend.h"
#include "mirror_copy.h"

namespace torch_shmem {
namespace ops {

using core::Blocked;
using core::Deadline;
using core::Error;
using core::ErrorKind;
using core::Stream;

namespace {
GpuBackend* g_gpu_backend = nullptr;
}  // namespace

GpuBackend* gpu_backend() { return g_gpu_backend; }
void set_gpu_backend(GpuBackend* backend) { g_gpu_backend = backend; }

bool mirror_copy_via_op(void* src, void* dst, uint64_t nbytes, int device) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("shmem::mirror_copy", "");
  if (!op.hasKernelForDispatchKey(device >= 0 ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU))
    return false;
  const auto n = static_cast<int64_t>(nbytes);
  auto src_opts = at::TensorOptions().dtype(at::kByte);
  if (device >= 0) src_opts = src_opts.device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  at::Tensor s = at::from_blob(src, {n}, src_opts);
  at::Tensor d = at::from_blob(dst, {n}, at::TensorOptions().dtype(at::kByte));
  op.typed<void(const at::Tensor&, at::Tensor&)>().call(s, d);
  return true;
}

namespace {

std::mutex g_mu;
// Never destroyed: at process exit the CUDA runtime may already be torn
// down when static destructors run, and the kernel reclaims the mappings
// (host and device) anyway.
std::unordered_map<int64_t, std::shared_ptr<Entry>>& g_entries =
    *new std::unordered_map<int64_t, std::shared_ptr<Entry>>();
int64_t g_next_id = 1;  // never reused, so a closed token never aliases a new stream

[[noreturn]] void rethrow(const char* op, const std::string& name, const Error& e) {
  std::string msg = std::string("shmem::") + op + ": stream '" + name + "': " + e.what();
  switch (e.kind()) {
    case ErrorKind::kValue:
      TORCH_CHECK_VALUE(false, msg);
    case ErrorKind::kNotFound:
      TORCH_CHECK(false, msg, "; create it with torch_shmem.ops.create('", name, "', ...)");
    case ErrorKind::kExists:
      TORCH_CHECK(false, msg, "; attach to it with torch_shmem.ops.open('", name, "')");
    default:
      TORCH_CHECK(false, msg);
  }
}

c10::ScalarType to_scalar_type(uint32_t code) {
  switch (code) {
#define TORCH_SHMEM_X(e, c, size, name, np, th) \
  case c:                                       \
    return at::k##th;
    TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
    default:
      return at::ScalarType::Undefined;
  }
}

uint32_t to_code(c10::ScalarType t) {
  switch (t) {
#define TORCH_SHMEM_X(e, c, size, name, np, th) \
  case at::k##th:                               \
    return c;
    TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
    default:
      return 0;
  }
}

std::vector<int64_t> stream_shape(const Stream& s) {
  const auto* h = s.geometry();
  return std::vector<int64_t>(h->shape, h->shape + h->ndim);
}

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

at::Tensor register_stream(Stream* raw, std::shared_ptr<core::SlotMemory> dev = nullptr,
                           int device = -1) {
  auto e = std::make_shared<Entry>();
  e->stream.reset(raw);
  e->dev = std::move(dev);
  e->device = device;
  // A writable handle of a mirrored GPU stream copies every publication
  // into the CPU payload: page-lock and map it once, so the mirror kernel
  // can store into it from the device (and a DMA can write it directly).
  if (e->dev != nullptr && device >= 0 && (raw->geometry()->flags & core::kFlagCpuMirror) &&
      !raw->readonly() && raw->payload() != nullptr && gpu_backend() != nullptr)
    e->host_pin = gpu_backend()->pin_host(raw->payload(), raw->geometry()->payload_bytes, device);
  e->name = raw->name();
  std::memcpy(&e->iid_lo, raw->geometry()->instance_id, 8);
  std::memcpy(&e->iid_hi, raw->geometry()->instance_id + 8, 8);
  int64_t id;
  {
    std::lock_guard<std::mutex> g(g_mu);
    id = g_next_id++;
    g_entries[id] = e;
  }
  at::Tensor token = at::empty({4}, at::TensorOptions().dtype(at::kLong));
  auto* p = token.data_ptr<int64_t>();
  p[0] = id;
  p[1] = e->iid_lo;
  p[2] = e->iid_hi;
  p[3] = static_cast<int64_t>(raw->count());
  return token;
}

void check_token(const at::Tensor& token, const char* op) {
  TORCH_CHECK_VALUE(token.device().is_cpu() && token.scalar_type() == at::kLong &&
                        token.dim() == 1 && token.numel() == 4 && token.is_contiguous(),
                    "shmem::", op,
                    ": expected a stream token (the int64[4] CPU tensor returned by "
                    "torch_shmem.ops.open/create), got a ",
                    token.scalar_type(), " tensor of shape ", token.sizes(), " on ",
                    token.device());
}

// Resolves a token to its registry entry (kept alive for the call).
std::shared_ptr<Entry> lookup(const at::Tensor& token, const char* op) {
  check_token(token, op);
  const int64_t* p = token.data_ptr<int64_t>();
  std::shared_ptr<Entry> e;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_entries.find(p[0]);
    if (it != g_entries.end()) e = it->second;
  }
  TORCH_CHECK(e != nullptr, "shmem::", op,
              ": the stream token refers to a stream closed in this process (handle ",
              p[0], "); reopen it with torch_shmem.ops.open(name)");
  TORCH_CHECK(p[1] == e->iid_lo && p[2] == e->iid_hi, "shmem::", op, ": stream '", e->name,
              "': the token does not match the stream's generation");
  TORCH_CHECK(!e->closing.load(), "shmem::", op, ": stream '", e->name,
              "' is closed; reopen it with torch_shmem.ops.open('", e->name, "')");
  return e;
}

void check_payload_tensor(const Entry& e, const at::Tensor& t, const char* op, const char* what) {
  const Stream& s = *e.stream;
  auto want_dtype = to_scalar_type(s.geometry()->dtype_code);
  auto want_shape = stream_shape(s);
  TORCH_CHECK_VALUE(t.scalar_type() == want_dtype, "shmem::", op, ": stream '", e.name,
                    "': expected ", what, " of dtype ", want_dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().vec() == want_shape, "shmem::", op, ": stream '", e.name,
                    "': expected ", what, " of shape ", shape_str(want_shape), ", got ",
                    shape_str(t.sizes()));
  if (e.dev == nullptr) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "shmem::", op, ": stream '", e.name,
                      "' is a CPU stream; expected ", what, " on the CPU, got ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.device().is_cpu() || (t.device().is_cuda() && t.device().index() == e.device),
                      "shmem::", op, ": stream '", e.name, "' lives on cuda:", e.device,
                      "; expected ", what, " on cuda:", e.device, " or the CPU, got ", t.device());
  }
}

bool on_device(const at::Tensor& t) { return t.device().is_cuda(); }

core::Session session_of(const Entry& e) { return core::Session(*e.stream, e.dev.get()); }

// Raises the Python exception that is set (the caller holds the GIL through
// `gil`) out of the op: torch's Python binding of the dispatcher restores a
// python_error as that very exception (KeyboardInterrupt from a signal
// handler, StreamUnlinkedError...).
[[noreturn]] void throw_python_error(PyGILState_STATE gil) {
  python_error err;
  err.persist();  // fetches and clears the error indicator
  PyGILState_Release(gil);
  throw err;
}

// Called between the slices of a blocking op. torch releases the GIL around
// op calls, so Python cannot run its signal handlers while an op blocks;
// here, in the main thread (the only one Python runs them in), take the GIL
// briefly and run them. If one raises (KeyboardInterrupt on Ctrl-C) the op
// ends with that exception. Callers hold no stream lock at this point.
// Nothing happens without an interpreter (torch used from C++ only).
void honour_signals() {
  if (!Py_IsInitialized() || static_cast<pid_t>(syscall(SYS_gettid)) != getpid()) return;
  PyGILState_STATE gil = PyGILState_Ensure();
  if (PyErr_CheckSignals() != 0) throw_python_error(gil);
  PyGILState_Release(gil);
}

// A wait for a publication newer than `after` ended because the stream was
// unlinked (Stream::wait_slice): raises torch_shmem.StreamReplacedError when
// the name now holds another generation, else StreamUnlinkedError (both
// RuntimeError subclasses; a plain RuntimeError without an interpreter).
[[noreturn]] void raise_gone(Entry& e, uint64_t after, const char* op) {
  Stream::NameState state = Stream::NameState::kGone;
  try {
    state = Stream::name_state(e.name, e.stream->geometry()->instance_id);
  } catch (const Error&) {
  }
  const bool replaced = state == Stream::NameState::kOther;
  std::string msg = std::string("shmem::") + op + ": stream '" + e.name + "' " +
                    (replaced ? "was unlinked and re-created: the name now holds a new "
                                "generation, and this token still maps the old one"
                              : "was unlinked (its producer removed it, or it was purged) and "
                                "nothing has re-created the name yet") +
                    "; a wait for a publication newer than count " + std::to_string(after) +
                    " would never end; " +
                    (replaced ? "open the new generation with torch_shmem.ops.open('" + e.name +
                                    "')"
                              : "torch_shmem.open('" + e.name +
                                    "', wait=seconds) waits for a producer to create it again");
  if (Py_IsInitialized()) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* mod = PyImport_ImportModule("torch_shmem._core");
    PyObject* cls = mod == nullptr ? nullptr
                                   : PyObject_GetAttrString(
                                         mod, replaced ? "StreamReplacedError" : "StreamUnlinkedError");
    Py_XDECREF(mod);
    if (cls != nullptr) {
      PyErr_SetString(cls, msg.c_str());
      Py_DECREF(cls);
      throw_python_error(gil);
    }
    PyErr_Clear();
    PyGILState_Release(gil);
  }
  TORCH_CHECK(false, msg);
}

// The between-slices hook of blocking ops: ends the op when the token is
// closed (false) or a signal handler raises (honour_signals throws).
struct OpSlices {
  Entry& e;
  bool operator()() const {
    if (e.closing.load()) return false;
    honour_signals();
    return true;
  }
};

// Maps how a blocking session call ended (after: the count a wait was for).
void check_blocked(Blocked b, Entry& e, const char* op, uint64_t after = 0) {
  if (b == Blocked::kGone) raise_gone(e, after, op);
  TORCH_CHECK(b == Blocked::kDone, "shmem::", op, ": stream '", e.name,
              "' was closed while waiting");
}

// Takes the stream lock in bounded slices (torch releases the GIL around
// op calls), giving up on close() or at the deadline.
void lock_stream(Entry& e, const char* op, const Deadline& d) {
  OpSlices slices{e};
  try {
    check_blocked(session_of(e).lock_until(d, slices), e, op);
  } catch (const Error& err) {
    rethrow(op, e.name, err);
  }
}

// Waits on the host until the stream's count exceeds `after` (spin, then
// the futex, in slices that check close() and signals), up to the
// deadline; an unlink of the stream ends it (raise_gone). Never holds the
// stream lock.
void wait_count_after(Entry& e, uint64_t after, const Deadline& d, const char* op) {
  OpSlices slices{e};
  Blocked b;
  try {
    b = session_of(e).wait_until(after, d, slices);
  } catch (const Error& err) {
    rethrow(op, e.name, err);
  }
  check_blocked(b, e, op, after);
}

// A GPU stream's reader queue (the current CUDA stream) parked by
// wait_device on a count not published yet: wait for that count on the host
// first, so that nothing queued behind the park blocks this thread (or, for
// a ring's counter store, the writer that would publish the count).
void settle_park(Entry& e, const Deadline& d, const char* op) {
  if (e.dev == nullptr) return;
  if (const uint64_t parked = e.dev->unresolved_park(); parked != 0)
    wait_count_after(e, parked - 1, d, op);
}

// Copies one completed publication into dst (on the device when
// dst_on_device; GPU streams only). A reader queue parked by wait_device on
// a count not published yet (the current CUDA stream) first waits for it on
// the host: the copy queued behind the park would otherwise block this
// thread inside a CUDA synchronize, possibly holding the stream lock that
// the publishing writer needs.
void snapshot(Entry& e, void* dst, bool dst_on_device, const char* op, const Deadline& d,
              core::Snapshot* snap) {
  settle_park(e, d, op);
  OpSlices slices{e};
  Blocked b;
  try {
    b = session_of(e).read(dst, dst_on_device, d, slices, snap);
  } catch (const Error& err) {
    rethrow(op, e.name, err);
  }
  check_blocked(b, e, op);
}

void publish_bytes(Entry& e, const at::Tensor& src, const char* op, bool has_fid = false,
                   uint64_t fid = 0) {
  TORCH_CHECK(!e.stream->readonly(), "shmem::", op, ": stream '", e.name, "' is open read-only");
  at::Tensor c = src.contiguous();
  if (core::is_ring(e.stream->geometry())) {
    // A ring applies its policy (block: wait for the slowest live cursor,
    // in slices that honour close() and signals; drop_newest: drop).
    OpSlices slices{e};
    uint64_t count = 0;
    Blocked b;
    try {
      b = session_of(e).ring_write(c.data_ptr(), has_fid, fid, Deadline(), slices, &count,
                                   on_device(c));
    } catch (const Error& err) {
      rethrow(op, e.name, err);
    }
    check_blocked(b, e, op);
    return;
  }
  lock_stream(e, op, Deadline());
  core::LockGuard held(*e.stream);
  try {
    session_of(e).write_locked(c.data_ptr(), on_device(c), has_fid, fid);
  } catch (const Error& err) {
    rethrow(op, e.name, err);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Control ops (eager only)
// ---------------------------------------------------------------------------

at::Tensor op_create(c10::string_view name, at::IntArrayRef shape, c10::ScalarType dtype,
                      int64_t mode) {
  std::string n(name);
  core::CreateOptions g;
  g.dtype_code = to_code(dtype);
  TORCH_CHECK_VALUE(g.dtype_code != 0 && dtype != at::kBFloat16, "shmem::create: stream '", n,
                    "': unsupported dtype ", dtype);
  TORCH_CHECK_VALUE(shape.size() <= core::kMaxDims, "shmem::create: stream '", n, "': shape has ",
                    shape.size(), " dimensions; the limit is ", core::kMaxDims);
  g.ndim = static_cast<uint32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) g.shape[i] = shape[i];
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 0777, "shmem::create: stream '", n,
                    "': mode must be within 0o777");
  g.mode = static_cast<uint32_t>(mode);
  try {
    return register_stream(Stream::create(n, g));
  } catch (const Error& err) {
    rethrow("create", n, err);
  }
}

// open(name, readonly, device): device < 0 attaches a GPU stream to the
// device it was created on (matched by uuid, so CUDA_VISIBLE_DEVICES may
// differ between processes).
at::Tensor op_open(c10::string_view name, bool readonly, int64_t device) {
  std::string n(name);
  Stream* s = nullptr;
  try {
    s = Stream::open(n, readonly);
  } catch (const Error& err) {
    rethrow("open", n, err);
  }
  std::unique_ptr<Stream> guard(s);
  TORCH_CHECK_VALUE(to_scalar_type(s->geometry()->dtype_code) != at::ScalarType::Undefined,
                    "shmem::open: stream '", n, "' has an unknown dtype");
  if (!(s->geometry()->flags & core::kFlagGpu)) return register_stream(guard.release());
  if (s->geometry()->flags & core::kFlagSimDevice) {
    core::HostSlotMemory* m = nullptr;
    try {
      m = core::HostSlotMemory::open(n, s->geometry()->device_bytes, s->geometry()->instance_id);
    } catch (const Error& err) {
      rethrow("open", n, err);
    }
    // Simulated device memory (streams flagged kFlagSimDevice, made by
    // tests): the slot protocol on host shared memory through these same
    // ops, with CPU tensors, so the GPU streams' op paths run without a GPU;
    // the mirror copy goes through shmem::mirror_copy (its CPU kernel), as
    // the CUDA backend's goes through the CUDA kernel.
    m->set_geometry(s->geometry()->slot_stride, s->geometry()->payload_bytes);
    m->set_mirror_copier(
        [](void* src, void* dst, uint64_t n) { return mirror_copy_via_op(src, dst, n, -1); });
    return register_stream(guard.release(), std::shared_ptr<core::SlotMemory>(m), -1);
  }
  GpuBackend* b = gpu_backend();
  TORCH_CHECK(b != nullptr, "shmem::open: stream '", n,
              "' is a GPU stream and this build of torch_shmem has no CUDA support");
  int used = -1;
  auto dev = b->attach(s->geometry(), static_cast<int>(device), &used);
  return register_stream(guard.release(), std::move(dev), used);
}

at::Tensor op_create_gpu(c10::string_view name, at::IntArrayRef shape, c10::ScalarType dtype,
                      int64_t device, int64_t nslots, bool cpu_mirror, int64_t mode,
                      bool notify, int64_t ring_policy) {
  std::string n(name);
  GpuBackend* b = gpu_backend();
  TORCH_CHECK(b != nullptr, "shmem::create_gpu: stream '", n,
              "': this build of torch_shmem has no CUDA support");
  core::CreateOptions g;
  g.dtype_code = to_code(dtype);
  TORCH_CHECK_VALUE(g.dtype_code != 0, "shmem::create_gpu: stream '", n, "': unsupported dtype ",
                    dtype);
  TORCH_CHECK_VALUE(shape.size() <= core::kMaxDims, "shmem::create_gpu: stream '", n,
                    "': too many dimensions");
  TORCH_CHECK_VALUE(nslots >= core::kMinSlots && nslots <= core::kMaxSlots,
                    "shmem::create_gpu: stream '", n, "': nslots must be in [", core::kMinSlots,
                    ", ", core::kMaxSlots, "], got ", nslots);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 0777, "shmem::create_gpu: stream '", n,
                    "': mode must be within 0o777");
  g.ndim = static_cast<uint32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) g.shape[i] = shape[i];
  g.mode = static_cast<uint32_t>(mode);
  TORCH_CHECK_VALUE(ring_policy >= -1 && ring_policy <= core::kRingDropNewest,
                    "shmem::create_gpu: stream '", n, "': ring_policy must be -1 (no ring) or 0 to ",
                    int(core::kRingDropNewest), ", got ", ring_policy);
  TORCH_CHECK_VALUE(ring_policy < 0 || !cpu_mirror, "shmem::create_gpu: stream '", n,
                    "': a GPU ring keeps no CPU mirror");
  g.flags = core::kFlagGpu | (cpu_mirror ? core::kFlagCpuMirror : 0) |
            (notify ? core::kFlagNotify : 0) | (ring_policy >= 0 ? core::kFlagRing : 0);
  if (ring_policy >= 0) g.ring_policy = static_cast<uint32_t>(ring_policy);
  g.nslots = static_cast<uint32_t>(nslots);
  std::shared_ptr<core::SlotMemory> dev;
  g.init_device = [&](core::Header* h) { dev = b->create(h, static_cast<int>(device)); };
  try {
    Stream* s = Stream::create(n, g);
    return register_stream(s, std::move(dev), static_cast<int>(device));
  } catch (const Error& err) {
    rethrow("create_gpu", n, err);
  }
}

// close(stream): forgets the token; blocked waits on it return with an
// error; the mapping goes away when the last in-flight call finishes.
void op_close(const at::Tensor& token) {
  check_token(token, "close");
  int64_t id = token.data_ptr<int64_t>()[0];
  std::shared_ptr<Entry> e;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_entries.find(id);
    if (it == g_entries.end()) return;  // idempotent
    e = it->second;
    g_entries.erase(it);
  }
  e->closing.store(true);
  e->stream->wake_all();
}

bool op_unlink(c10::string_view name) {
  std::string n(name);
  try {
    // A GPU stream's instance, read before the name goes: once it is
    // unlinked (and flagged so), the creating process drops its own
    // reference to the allocation, which is freed when no other live
    // process maps it (importers registering after the flag back out).
    uint8_t iid[16];
    bool gpu = false;
    if (gpu_backend() != nullptr) {
      try {
        std::unique_ptr<Stream> s(Stream::open(n, true));
        gpu = (s->geometry()->flags & core::kFlagGpu) != 0;
        std::memcpy(iid, s->geometry()->instance_id, 16);
      } catch (const Error&) {
      }
    }
    const bool removed = Stream::unlink_name(n);
    if (gpu) gpu_backend()->forget(iid);
    return removed;
  } catch (const Error& err) {
    rethrow("unlink", n, err);
  }
}

// info(stream) -> (name, shape, dtype code of the stream header, CUDA
// ordinal or -1 for a CPU stream)
std::tuple<std::string, std::vector<int64_t>, int64_t, int64_t> op_info(const at::Tensor& token) {
  auto e = lookup(token, "info");
  return {e->name, stream_shape(*e->stream),
          static_cast<int64_t>(e->stream->geometry()->dtype_code), static_cast<int64_t>(e->device)};
}

// ---------------------------------------------------------------------------
// Data ops (CPU streams)
// ---------------------------------------------------------------------------

// The data ops below serve CPU and GPU streams alike (registered for the
// CPU and, in CUDA builds, the CUDA dispatch keys): GPU streams go through
// the slot protocol, with host tensors uploaded/downloaded by the copies.
// frame_id: the uint64 token stamped with the write, passed as its int64
// bit pattern (the schema has no unsigned type).
void publish_impl(at::Tensor& token, const at::Tensor& src, std::optional<int64_t> frame_id) {
  auto e = lookup(token, "publish");
  check_payload_tensor(*e, src, "publish", "src");
  publish_bytes(*e, src, "publish", frame_id.has_value(),
                frame_id.has_value() ? static_cast<uint64_t>(*frame_id) : 0);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(e->stream->count());
}

void read_into_impl(at::Tensor& token, at::Tensor& out) {
  auto e = lookup(token, "read_into");
  check_payload_tensor(*e, out, "read_into", "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "shmem::read_into: stream '", e->name,
                    "': out must be contiguous");
  core::Snapshot snap;
  snapshot(*e, out.data_ptr(), on_device(out), "read_into", Deadline(), &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
}

at::Tensor read_impl(at::Tensor& token, at::IntArrayRef shape, c10::ScalarType dtype,
                     c10::string_view device) {
  auto e = lookup(token, "read");
  c10::Device dev{std::string(device)};
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype).device(dev));
  check_payload_tensor(*e, out, "read", "result");
  core::Snapshot snap;
  snapshot(*e, out.data_ptr(), on_device(out), "read", Deadline(), &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
  return out;
}

// Waits until the stream's count exceeds the token's last_count (the
// publication this token last saw), then reads into out. Level-triggered:
// a publication that landed before the call is returned at once.
void wait_read_into_impl(at::Tensor& token, at::Tensor& out, double timeout) {
  auto e = lookup(token, "wait_read_into");
  check_payload_tensor(*e, out, "wait_read_into", "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "shmem::wait_read_into: stream '", e->name,
                    "': out must be contiguous");
  const uint64_t after = static_cast<uint64_t>(token.data_ptr<int64_t>()[3]);
  const Deadline d = Deadline::after(timeout);
  wait_count_after(*e, after, d, "wait_read_into");
  core::Snapshot snap;
  snapshot(*e, out.data_ptr(), on_device(out), "wait_read_into", d, &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
}

// ---------------------------------------------------------------------------
// Rings (csrc/core/ring.h)
// ---------------------------------------------------------------------------

void check_ring(const Entry& e, const char* op) {
  TORCH_CHECK(core::is_ring(e.stream->geometry()), "shmem::", op, ": stream '", e.name,
              "' is not a ring; create it with torch_shmem.create(..., ring=N)");
}

int64_t check_cursor(const Entry& e, int64_t cursor, const char* op) {
  TORCH_CHECK_VALUE(cursor >= 0 && cursor < static_cast<int64_t>(core::kMaxCursors), "shmem::",
                    op, ": stream '", e.name, "': expected a cursor index in [0, ",
                    core::kMaxCursors, "), got ", cursor);
  return cursor;
}

// cursor(stream, name) -> index: attaches the ring cursor `name` for this
// process (eager only; under the stream lock, in slices).
int64_t op_cursor(const at::Tensor& token, c10::string_view name) {
  auto e = lookup(token, "cursor");
  check_ring(*e, "cursor");
  const std::string n(name);
  TORCH_CHECK_VALUE(!n.empty() && n.size() <= core::kMaxCursorNameBytes &&
                        n.find('\0') == std::string::npos,
                    "shmem::cursor: stream '", e->name, "': a cursor name must be 1 to ",
                    core::kMaxCursorNameBytes, " bytes without NUL, got '", n, "'");
  OpSlices slices{*e};
  uint32_t index = 0;
  Blocked b;
  try {
    b = session_of(*e).ring_attach(n, Deadline(), slices, &index);
  } catch (const Error& err) {
    rethrow("cursor", e->name, err);
  }
  check_blocked(b, *e, "cursor");
  return index;
}

// cursor_release(stream, cursor): releases a cursor this process holds.
void op_cursor_release(const at::Tensor& token, int64_t cursor) {
  auto e = lookup(token, "cursor_release");
  check_ring(*e, "cursor_release");
  core::ring_detach(*e->stream,
                    static_cast<uint32_t>(check_cursor(*e, cursor, "cursor_release")));
}

// read_next(stream, cursor, out, timeout) -> int64[4] (count, missed,
// frame_id bit pattern, write_time_ns): the cursor's next publication into
// out; blocks (slices, close() and signals honoured) up to timeout (< 0:
// forever). Records the count in token[3].
at::Tensor read_next_impl(at::Tensor& token, int64_t cursor, at::Tensor& out, double timeout) {
  auto e = lookup(token, "read_next");
  check_ring(*e, "read_next");
  check_cursor(*e, cursor, "read_next");
  check_payload_tensor(*e, out, "read_next", "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "shmem::read_next: stream '", e->name,
                    "': out must be contiguous");
  const uint32_t index = static_cast<uint32_t>(cursor);
  // A GPU ring read queues the cursor's counter store on the current CUDA
  // stream, which the writer may wait for.
  settle_park(*e, Deadline::after(timeout), "read_next");
  const uint64_t after =
      core::ring_cursor(*e->stream, index)->consumed.load(std::memory_order_acquire);
  OpSlices slices{*e};
  core::Snapshot snap;
  uint64_t missed = 0;
  Blocked b;
  try {
    // A GPU ring queues the copy on the current CUDA stream (no wait).
    b = session_of(*e).ring_next(index, out.data_ptr(), Deadline::after(timeout), slices, &snap,
                                 &missed, on_device(out));
  } catch (const Error& err) {
    rethrow("read_next", e->name, err);
  }
  check_blocked(b, *e, "read_next", after);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
  at::Tensor meta = at::empty({4}, at::TensorOptions().dtype(at::kLong));
  int64_t* m = meta.data_ptr<int64_t>();
  m[0] = static_cast<int64_t>(snap.count);
  m[1] = static_cast<int64_t>(missed);
  m[2] = static_cast<int64_t>(snap.frame_id);
  m[3] = snap.write_time_ns;
  return meta;
}

// live_view(stream, count=-1) -> a slot of a GPU stream, aliased (eager
// only); the view keeps the device mapping alive. count < 1: the latest
// slot, meaningful while the caller holds the stream's lock (no writer can
// publish meanwhile). count >= 1: the slot publication `count` goes to
// (count % nslots), for consumers that ordered their CUDA stream after it
// with wait_device; it holds that publication until the writer starts
// publication count + nslots.
at::Tensor op_live_view(const at::Tensor& token, int64_t count) {
  auto e = lookup(token, "live_view");
  TORCH_CHECK(e->dev != nullptr, "shmem::live_view: stream '", e->name,
              "' is a CPU stream; use torch_shmem.SharedMemory.read(safe=False)");
  const uint32_t nslots = e->stream->geometry()->nslots;
  uint32_t k = count >= 1 ? static_cast<uint32_t>(static_cast<uint64_t>(count) % nslots)
                          : e->stream->header()->latest_slot.load(std::memory_order_acquire);
  TORCH_CHECK(k < nslots, "shmem::live_view: stream '", e->name, "': corrupted latest slot");
  std::shared_ptr<core::SlotMemory> keep = e->dev;
  auto opts = at::TensorOptions().dtype(to_scalar_type(e->stream->geometry()->dtype_code));
  if (e->device >= 0)  // else simulated device memory: host pages
    opts = opts.device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(e->device)));
  // The deleter runs when the last view goes, possibly while kernels that
  // read it are still queued: on a GPU the mapping is released only after
  // the work queued so far on the device's current CUDA stream completes.
  const int device = e->device;
  return at::from_blob(
      e->dev->slot_ptr(k), stream_shape(*e->stream),
      [keep, device](void*) mutable {
        if (device >= 0 && gpu_backend() != nullptr)
          gpu_backend()->release_after_queued_work(std::move(keep), device);
        keep.reset();
      },
      opts);
}

// wait_device(stream, count): the current CUDA stream of the stream's
// device waits, on the device, until publication `count` is complete in its
// slot (device counter >= count); the host returns at once. Queue it only
// for a count the writer will reach: nothing times out on the device.
void wait_device_impl(at::Tensor& token, int64_t count) {
  auto e = lookup(token, "wait_device");
  TORCH_CHECK_VALUE(e->dev != nullptr, "shmem::wait_device: stream '", e->name,
                    "' is a CPU stream and has no device counter; use wait_read_into");
  TORCH_CHECK_VALUE(count >= 1, "shmem::wait_device: stream '", e->name,
                    "': expected a count >= 1, got ", count);
  // Simulated device memory: the calling thread stands for the reader
  // queue; the park is resolved by its next read (which waits on the host).
  e->dev->park(static_cast<uint64_t>(count));
}

at::Tensor op_count(const at::Tensor& token) {
  auto e = lookup(token, "count");
  return at::scalar_tensor(static_cast<int64_t>(e->stream->count()),
                           at::TensorOptions().dtype(at::kLong));
}

TORCH_LIBRARY(shmem, m) {
  // control (eager only)
  m.def("create(str name, int[] shape, ScalarType dtype, int mode=384) -> Tensor");
  m.def("open(str name, bool readonly=False, int device=-1) -> Tensor");
  m.def(
      "create_gpu(str name, int[] shape, ScalarType dtype, int device, int nslots=3, "
      "bool cpu_mirror=False, int mode=384, bool notify=False, int ring_policy=-1) -> Tensor");
  m.def("close(Tensor stream) -> ()");
  m.def("unlink(str name) -> bool");
  m.def("info(Tensor stream) -> (str, int[], int, int)");
  // data (per frame; compile-safe)
  m.def("publish(Tensor(a!) stream, Tensor src, int? frame_id=None) -> ()");
  m.def("read_into(Tensor(a!) stream, Tensor(b!) out) -> ()");
  // device is a str (not Device) so that opcheck's schema checker can inspect it
  m.def("read(Tensor(a!) stream, SymInt[] shape, ScalarType dtype, str device=\"cpu\") -> Tensor");
  m.def("wait_read_into(Tensor(a!) stream, Tensor(b!) out, float timeout=-1.0) -> ()");
  m.def("count(Tensor stream) -> Tensor");
  m.def("live_view(Tensor stream, int count=-1) -> Tensor");
  m.def("wait_device(Tensor(a!) stream, int count) -> ()");
  // The CPU-mirror copy of GPU streams, byte for byte (same shape and
  // dtype; dst usually page-locked host memory). Implemented in Python
  // (torch_shmem/ops.py: the Triton kernel, or torch's copy); the write path
  // of mirrored GPU streams calls it through the dispatcher.
  m.def("mirror_copy(Tensor src, Tensor(a!) dst) -> ()");
  // Rings: cursor/cursor_release are control ops (eager only); read_next
  // is a data op (CPU).
  m.def("cursor(Tensor stream, str name) -> int");
  m.def("cursor_release(Tensor stream, int cursor) -> ()");
  m.def("read_next(Tensor(a!) stream, int cursor, Tensor(b!) out, float timeout=-1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(shmem, CompositeExplicitAutograd, m) {
  // Ops without tensor arguments (or whose stream token is always on the
  // CPU) dispatch here regardless of other tensors' devices.
  m.impl("create", &op_create);
  m.impl("open", &op_open);
  m.impl("create_gpu", &op_create_gpu);
  m.impl("close", &op_close);
  m.impl("unlink", &op_unlink);
  m.impl("info", &op_info);
  m.impl("count", &op_count);
  m.impl("live_view", &op_live_view);
  m.impl("wait_device", &wait_device_impl);
  m.impl("cursor", &op_cursor);
  m.impl("cursor_release", &op_cursor_release);
}

// The data ops are not differentiable: publishing or reading a tensor that
// requires grad works, and a backward through the result raises.
TORCH_LIBRARY_IMPL(shmem, Autograd, m) {
  for (const char* op : {"publish", "read_into", "read", "wait_read_into", "read_next"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(shmem, CPU, m) {
  m.impl("publish", &publish_impl);
  m.impl("read_into", &read_into_impl);
  m.impl("read", &read_impl);
  m.impl("wait_read_into", &wait_read_into_impl);
  m.impl("read_next", &read_next_impl);
}

#ifdef TORCH_SHMEM_WITH_CUDA
// Same kernels for CUDA tensors: the slot copies run on the current CUDA
// stream of the tensor's device (csrc/cuda/gpu_stream.cu).
TORCH_LIBRARY_IMPL(shmem, CUDA, m) {
  m.impl("read_next", &read_next_impl);
  m.impl("publish", &publish_impl);
  m.impl("read_into", &read_into_impl);
  m.impl("read", &read_impl);
  m.impl("wait_read_into", &wait_read_into_impl);
}
#endif

}  // namespace ops
}  // namespace torch_shmem

// Importing the module runs the static registrations; its one function
// reports the CUDA half's counters and chosen paths.
// forget_instance(instance_id): after the name of generation instance_id
// (16 bytes) was removed by torch_shmem._core.unlink_if, this process drops
// its own reference to that generation's GPU allocation, as unlink does
// (nothing for CPU streams or without CUDA).
static PyObject* forget_instance(PyObject*, PyObject* arg) {
  char* iid = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(arg, &iid, &len) != 0) return nullptr;
  if (len != 16) {
    PyErr_SetString(PyExc_ValueError, "torch_shmem: instance_id must be 16 bytes");
    return nullptr;
  }
  if (auto* b = torch_shmem::ops::gpu_backend(); b != nullptr) b->forget(reinterpret_cast<const uint8_t*>(iid));
  Py_RETURN_NONE;
}

static PyObject* gpu_stats(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  auto* b = torch_shmem::ops::gpu_backend();
  if (b == nullptr) return d;
  for (const auto& kv : b->stats()) {
    PyObject* v = PyUnicode_FromString(kv.second.c_str());
    if (v == nullptr || PyDict_SetItemString(d, kv.first.c_str(), v) != 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}

static PyMethodDef shmem_ops_methods[] = {
    {"forget_instance", forget_instance, METH_O,
     "forget_instance(instance_id: bytes) -> None: drop this process's reference to the GPU "
     "allocation of an unlinked generation"},
    {"gpu_stats", gpu_stats, METH_NOARGS,
     "gpu_stats() -> dict of str: this process's GPU-stream paths and counters (empty without "
     "CUDA): device_wait_path and counter_store_path (memop, kernel or unused), "
     "device_wait_memops, device_wait_kernels, staged_uploads, mirror_dma_copies, "
     "parked_reads_waited, deferred_view_releases"},
    {nullptr, nullptr, 0, nullptr}};

// TORCH_SHMEM_NATIVE_BACKTRACE=1 (the GPU check sets it): a fatal signal
// first writes this thread's native frames to stderr, then goes on to the
// handler installed before (Python's faulthandler: the Python frames) or
// the default action. Diagnostics only; nothing is allocated in the handler.
namespace {
constexpr int kFatalSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
struct sigaction g_prev_actions[sizeof(kFatalSignals) / sizeof(int)];

void native_backtrace_handler(int sig, siginfo_t* info, void* uctx) {
  static const char head[] = "\ntorch_shmem: fatal signal, native frames of this thread:\n";
  (void)!write(2, head, sizeof(head) - 1);
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  for (size_t i = 0; i < sizeof(kFatalSignals) / sizeof(int); ++i) {
    if (kFatalSignals[i] != sig) continue;
    const struct sigaction& prev = g_prev_actions[i];
    sigaction(sig, &prev, nullptr);
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction != nullptr) {
      prev.sa_sigaction(sig, info, uctx);
      return;
    }
    if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
      prev.sa_handler(sig);
      return;
    }
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_native_backtrace() {
  const char* v = std::getenv("TORCH_SHMEM_NATIVE_BACKTRACE");
  if (v == nullptr || std::string(v) != "1") return;
  void* warm[1];
  (void)backtrace(warm, 1);  // loads libgcc_s now, not inside the handler
  struct sigaction sa {};
  sa.sa_sigaction = native_backtrace_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < sizeof(kFatalSignals) / sizeof(int); ++i)
    sigaction(kFatalSignals[i], &sa, &g_prev_actions[i]);
}
}  // namespace

static PyModuleDef shmem_ops_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "torch.ops.shmem registrations", -1, shmem_ops_methods};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&shmem_ops_module);
  if (m == nullptr) return nullptr;
  install_native_backtrace();
#ifdef TORCH_SHMEM_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
