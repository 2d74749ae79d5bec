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

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../core/stream.h"

namespace torch_shmem {
namespace ops {

using core::Error;
using core::ErrorKind;
using core::Stream;

namespace {

struct Entry {
  std::unique_ptr<Stream> stream;
  std::string name;
  int64_t iid_lo = 0;
  int64_t iid_hi = 0;
  std::atomic<bool> closing{false};
};

std::mutex g_mu;
std::unordered_map<int64_t, std::shared_ptr<Entry>> g_entries;
int64_t g_next_id = 1;  // never reused, so a closed token never aliases a new stream

constexpr double kSlice = 0.1;

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
  using namespace core;
  switch (code) {
    case kBool: return at::kBool;
    case kInt8: return at::kChar;
    case kUInt8: return at::kByte;
    case kInt16: return at::kShort;
    case kUInt16: return at::kUInt16;
    case kInt32: return at::kInt;
    case kUInt32: return at::kUInt32;
    case kInt64: return at::kLong;
    case kUInt64: return at::kUInt64;
    case kFloat16: return at::kHalf;
    case kFloat32: return at::kFloat;
    case kFloat64: return at::kDouble;
    case kComplex64: return at::kComplexFloat;
    case kComplex128: return at::kComplexDouble;
    case kBFloat16: return at::kBFloat16;
    default: return at::ScalarType::Undefined;
  }
}

uint32_t to_code(c10::ScalarType t) {
  using namespace core;
  switch (t) {
    case at::kBool: return kBool;
    case at::kChar: return kInt8;
    case at::kByte: return kUInt8;
    case at::kShort: return kInt16;
    case at::kUInt16: return kUInt16;
    case at::kInt: return kInt32;
    case at::kUInt32: return kUInt32;
    case at::kLong: return kInt64;
    case at::kUInt64: return kUInt64;
    case at::kHalf: return kFloat16;
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kComplexFloat: return kComplex64;
    case at::kComplexDouble: return kComplex128;
    case at::kBFloat16: return kBFloat16;
    default: return 0;
  }
}

std::vector<int64_t> stream_shape(const Stream& s) {
  const auto* h = s.header();
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

at::Tensor register_stream(Stream* raw) {
  auto e = std::make_shared<Entry>();
  e->stream.reset(raw);
  e->name = raw->name();
  std::memcpy(&e->iid_lo, raw->header()->instance_id, 8);
  std::memcpy(&e->iid_hi, raw->header()->instance_id + 8, 8);
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
  auto want_dtype = to_scalar_type(s.header()->dtype_code);
  auto want_shape = stream_shape(s);
  TORCH_CHECK_VALUE(t.scalar_type() == want_dtype, "shmem::", op, ": stream '", e.name,
                    "': expected ", what, " of dtype ", want_dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().vec() == want_shape, "shmem::", op, ": stream '", e.name,
                    "': expected ", what, " of shape ", shape_str(want_shape), ", got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.device().is_cpu(), "shmem::", op, ": stream '", e.name,
                    "' is a CPU stream; expected ", what, " on the CPU, got ", t.device());
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Takes the stream lock in bounded slices (torch releases the GIL around
// op calls), giving up on close() or after `timeout` seconds (< 0: never).
void lock_stream(Entry& e, const char* op, double timeout) {
  const double deadline = timeout < 0 ? 1e300 : now_s() + timeout;
  for (;;) {
    double slice = kSlice;
    if (timeout >= 0) slice = std::max(0.0, std::min(kSlice, deadline - now_s()));
    if (e.stream->lock_for(slice)) return;
    TORCH_CHECK(!e.closing.load(), "shmem::", op, ": stream '", e.name,
                "' was closed while waiting for its lock");
    TORCH_CHECK(timeout < 0 || now_s() < deadline, "shmem::", op, ": stream '", e.name,
                "': timed out after ", timeout, " s waiting for the write lock (held by pid ",
                e.stream->header()->owner_pid.load(), ")");
  }
}

void snapshot(Entry& e, void* dst, const char* op, double timeout, core::Snapshot* snap) {
  Stream& s = *e.stream;
  try {
    if (s.read_fast(dst, snap)) return;
  } catch (const Error& err) {
    rethrow(op, e.name, err);
  }
  lock_stream(e, op, timeout);
  try {
    *snap = s.read_locked(dst);
  } catch (const Error& err) {
    s.unlock();
    rethrow(op, e.name, err);
  }
  s.unlock();
}

}  // namespace

// ---------------------------------------------------------------------------
// Control ops (eager only)
// ---------------------------------------------------------------------------

at::Tensor create_cpu(c10::string_view name, at::IntArrayRef shape, c10::ScalarType dtype,
                      int64_t mode) {
  std::string n(name);
  core::Geometry g;
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

at::Tensor open_cpu(c10::string_view name, bool readonly) {
  std::string n(name);
  try {
    Stream* s = Stream::open(n, readonly);
    if (to_scalar_type(s->header()->dtype_code) == at::ScalarType::Undefined) {
      delete s;
      TORCH_CHECK_VALUE(false, "shmem::open: stream '", n, "' has an unknown dtype");
    }
    return register_stream(s);
  } catch (const Error& err) {
    rethrow("open", n, err);
  }
}

// close(stream): forgets the token; blocked waits on it return with an
// error; the mapping goes away when the last in-flight call finishes.
void close_cpu(const at::Tensor& token) {
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

bool unlink_cpu(c10::string_view name) {
  std::string n(name);
  try {
    return Stream::unlink_name(n);
  } catch (const Error& err) {
    rethrow("unlink", n, err);
  }
}

// info(stream) -> (name, shape, dtype code of the stream header)
std::tuple<std::string, std::vector<int64_t>, int64_t> info_cpu(const at::Tensor& token) {
  auto e = lookup(token, "info");
  return {e->name, stream_shape(*e->stream),
          static_cast<int64_t>(e->stream->header()->dtype_code)};
}

// ---------------------------------------------------------------------------
// Data ops (CPU streams)
// ---------------------------------------------------------------------------

void publish_cpu(at::Tensor& token, const at::Tensor& src) {
  auto e = lookup(token, "publish");
  check_payload_tensor(*e, src, "publish", "src");
  TORCH_CHECK(!e->stream->readonly(), "shmem::publish: stream '", e->name,
              "' is open read-only");
  at::Tensor c = src.contiguous();
  Stream& s = *e->stream;
  lock_stream(*e, "publish", -1);
  uint64_t count;
  try {
    count = s.write_locked(c.data_ptr(), false, 0);
  } catch (const Error& err) {
    s.unlock();
    rethrow("publish", e->name, err);
  }
  s.unlock();
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(count);
}

void read_into_cpu(at::Tensor& token, at::Tensor& out) {
  auto e = lookup(token, "read_into");
  check_payload_tensor(*e, out, "read_into", "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "shmem::read_into: stream '", e->name,
                    "': out must be contiguous");
  core::Snapshot snap;
  snapshot(*e, out.data_ptr(), "read_into", -1, &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
}

at::Tensor read_cpu(at::Tensor& token, at::IntArrayRef shape, c10::ScalarType dtype,
                    c10::string_view device) {
  auto e = lookup(token, "read");
  TORCH_CHECK_VALUE(c10::Device(std::string(device)).is_cpu(), "shmem::read: stream '", e->name,
                    "' is a CPU stream; expected device cpu, got ", device);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  check_payload_tensor(*e, out, "read", "shape/dtype");
  core::Snapshot snap;
  snapshot(*e, out.data_ptr(), "read", -1, &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
  return out;
}

// Waits until the stream's count exceeds the token's last_count (the
// publication this token last saw), then reads into out. Level-triggered:
// a publication that landed before the call is returned at once.
void wait_read_into_cpu(at::Tensor& token, at::Tensor& out, double timeout) {
  auto e = lookup(token, "wait_read_into");
  check_payload_tensor(*e, out, "wait_read_into", "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "shmem::wait_read_into: stream '", e->name,
                    "': out must be contiguous");
  const uint64_t after = static_cast<uint64_t>(token.data_ptr<int64_t>()[3]);
  const double start = now_s();
  const double deadline = timeout < 0 ? 1e300 : start + timeout;
  double spin = 50e-6;
  for (;;) {
    double remaining = deadline - now_s();
    double slice = remaining < kSlice ? remaining : kSlice;
    if (e->stream->wait_slice(after, spin, slice > 0 ? slice : 0)) break;
    spin = 0;
    TORCH_CHECK(!e->closing.load(), "shmem::wait_read_into: stream '", e->name,
                "' was closed while waiting");
    TORCH_CHECK(now_s() < deadline, "shmem::wait_read_into: stream '", e->name,
                "': timed out after ", timeout, " s waiting for a publication newer than count ",
                after);
  }
  core::Snapshot snap;
  double left = timeout < 0 ? -1 : std::max(0.0, deadline - now_s());
  snapshot(*e, out.data_ptr(), "wait_read_into", left, &snap);
  token.data_ptr<int64_t>()[3] = static_cast<int64_t>(snap.count);
}

at::Tensor count_cpu(const at::Tensor& token) {
  auto e = lookup(token, "count");
  return at::scalar_tensor(static_cast<int64_t>(e->stream->count()),
                           at::TensorOptions().dtype(at::kLong));
}

TORCH_LIBRARY(shmem, m) {
  // control (eager only)
  m.def("create(str name, int[] shape, ScalarType dtype, int mode=384) -> Tensor");
  m.def("open(str name, bool readonly=False) -> Tensor");
  m.def("close(Tensor stream) -> ()");
  m.def("unlink(str name) -> bool");
  m.def("info(Tensor stream) -> (str, int[], int)");
  // data (per frame; compile-safe)
  m.def("publish(Tensor(a!) stream, Tensor src) -> ()");
  m.def("read_into(Tensor(a!) stream, Tensor(b!) out) -> ()");
  // device is a str (not Device) so that opcheck's schema checker can inspect it
  m.def("read(Tensor(a!) stream, SymInt[] shape, ScalarType dtype, str device=\"cpu\") -> Tensor");
  m.def("wait_read_into(Tensor(a!) stream, Tensor(b!) out, float timeout=-1.0) -> ()");
  m.def("count(Tensor stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(shmem, CompositeExplicitAutograd, m) {
  // Ops without tensor arguments (or whose stream token is always on the
  // CPU) dispatch here regardless of other tensors' devices.
  m.impl("create", &create_cpu);
  m.impl("open", &open_cpu);
  m.impl("close", &close_cpu);
  m.impl("unlink", &unlink_cpu);
  m.impl("info", &info_cpu);
  m.impl("count", &count_cpu);
}

// The data ops are not differentiable: publishing or reading a tensor that
// requires grad works, and a backward through the result raises.
TORCH_LIBRARY_IMPL(shmem, Autograd, m) {
  for (const char* op : {"publish", "read_into", "read", "wait_read_into"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(shmem, CPU, m) {
  m.impl("publish", &publish_cpu);
  m.impl("read_into", &read_into_cpu);
  m.impl("read", &read_cpu);
  m.impl("wait_read_into", &wait_read_into_cpu);
}

}  // namespace ops
}  // namespace torch_shmem

// The module itself is empty: importing it runs the static registrations.
static PyModuleDef shmem_ops_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "torch.ops.shmem registrations", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&shmem_ops_module); }
