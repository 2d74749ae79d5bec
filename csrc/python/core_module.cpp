// torch_shmem._core: the NumPy-path binding of the C++ core.
//
// Plain CPython + NumPy C API (no torch, no pybind11): `import torch_shmem`
// must stay cheap and must not load libtorch, and the per-call overhead at
// small frame sizes is a large share of the total (see design.md, 4).
//
// The binding is mechanism only: it moves bytes, blocks in bounded slices
// with the GIL released, and maps core errors to Python exceptions at one
// choke point (raise_core_error). Argument policy (dtype casting, friendly
// messages, keyword handling) lives in torch_shmem/_stream.py.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <errno.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../core/notify.h"
#include "../core/ring.h"
#include "../core/session.h"
#include "../core/slots.h"
#include "../core/stream.h"

using torch_shmem::core::Blocked;
using torch_shmem::core::Deadline;
using torch_shmem::core::Error;
using torch_shmem::core::ErrorKind;
using torch_shmem::core::CreateOptions;
using torch_shmem::core::Snapshot;
using torch_shmem::core::Session;
using torch_shmem::core::Stream;

namespace {

PyObject* InconsistentStreamError = nullptr;
// StaleStreamError(RuntimeError) and its two subclasses: what happened to a
// handle's stream (see raise_gone).
PyObject* StaleStreamError = nullptr;
PyObject* StreamUnlinkedError = nullptr;
PyObject* StreamReplacedError = nullptr;

// Copies at least this large run with the GIL released.
constexpr uint64_t kReleaseGilBytes = 256 * 1024;

// PyErr_Format has no floating-point conversions (an unknown one ends the
// formatting and the rest of the format is copied verbatim), so seconds are
// formatted here and passed as %s.
struct Seconds {
  char text[32];
  explicit Seconds(double s) { snprintf(text, sizeof(text), "%.3g", s); }
};

// NumPy type number of a dtype code, -1 when NumPy cannot represent it.
int dtype_to_typenum(uint32_t code) {
  switch (code) {
#define TORCH_SHMEM_X(e, c, size, name, np, th) \
  case c:                                       \
    return NPY_##np == NPY_NOTYPE ? -1 : NPY_##np;
    TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
    default:
      return -1;
  }
}

struct Handle {
  PyObject_HEAD
  Stream* s;
  // Slotted stream with simulated device memory (kFlagSimDevice): the GPU
  // slot protocol over host shared memory, for testing it without a GPU.
  torch_shmem::core::HostSlotMemory* sim;
  PyObject* name;  // str
  int typenum;
  int ndim;
  npy_intp dims[torch_shmem::core::kMaxDims];
  uint64_t nbytes;
  std::atomic<int> inflight;
  bool closing;
  bool closed;
  Py_ssize_t exports;  // live buffer exports (unsafe views)
  // Lock levels taken through acquire() on this handle and not yet released,
  // all threads together (GIL-protected). close() waits for them to drop to
  // zero before unmapping: a lock held by a live thread through an unmapped
  // handle could never be released again.
  long held_levels;
  // read bookkeeping (exact: computed from the count of each snapshot)
  uint64_t last_read_count;
  uint64_t missed_writes;
  uint64_t total_missed_writes;
  Snapshot last;
  // Readiness descriptor (fileno()), made on first request; re-armed after
  // every read for publications newer than last_read_count.
  torch_shmem::core::Notifier* notify;
};

PyTypeObject HandleType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* raise_core_error(Handle* h, const Error& e) {
  std::string msg = e.what();
  if (h != nullptr && h->name != nullptr) {
    const char* n = PyUnicode_AsUTF8(h->name);
    if (n != nullptr && msg.find(std::string("'") + n + "'") == std::string::npos)
      msg = std::string("stream '") + n + "': " + msg;
  }
  msg = "torch_shmem: " + msg;
  switch (e.kind()) {
    case ErrorKind::kValue:
      PyErr_SetString(PyExc_ValueError, msg.c_str());
      break;
    case ErrorKind::kNotFound:
      PyErr_SetObject(PyExc_FileNotFoundError, Py_BuildValue("(is)", ENOENT, msg.c_str()));
      break;
    case ErrorKind::kExists:
      PyErr_SetObject(PyExc_FileExistsError, Py_BuildValue("(is)", EEXIST, msg.c_str()));
      break;
    case ErrorKind::kPermission:
      PyErr_SetObject(PyExc_PermissionError,
                      Py_BuildValue("(is)", e.err() ? e.err() : EACCES, msg.c_str()));
      break;
    case ErrorKind::kTimeout:
      PyErr_SetString(PyExc_TimeoutError, msg.c_str());
      break;
    case ErrorKind::kInconsistent:
      PyErr_SetString(InconsistentStreamError, msg.c_str());
      break;
    case ErrorKind::kState:
      PyErr_SetString(PyExc_RuntimeError, msg.c_str());
      break;
    case ErrorKind::kNoSpace:
    case ErrorKind::kOS:
      PyErr_SetObject(PyExc_OSError, Py_BuildValue("(is)", e.err(), msg.c_str()));
      break;
  }
  return nullptr;
}

PyObject* closed_error(Handle* h) {
  PyErr_Format(PyExc_RuntimeError,
               "torch_shmem: stream %R is closed on this handle (closed shared memory "
               "cannot be used); reopen it with torch_shmem.open(%R)",
               h->name, h->name);
  return nullptr;
}

// In-flight guard: close() waits for it to drop to zero before unmapping.
// `finishing` calls (release, commit/abort of a write view, the depth and
// sequence they consult) are still accepted while close() waits: they end
// what a thread started; refusing them would leave the lock held and the
// write unfinished whenever another thread closes the handle.
struct Guard {
  Handle* h;
  bool ok;
  explicit Guard(Handle* handle, bool finishing = false) : h(handle), ok(false) {
    if (h->closed || (h->closing && !finishing)) {
      closed_error(h);
      return;
    }
    h->inflight.fetch_add(1, std::memory_order_acq_rel);
    ok = true;
  }
  ~Guard() {
    if (ok) h->inflight.fetch_sub(1, std::memory_order_acq_rel);
  }
};

// Runs f() with the GIL released when `release` is true, converting core
// errors after the GIL is back. Returns false with a Python error set.
template <typename F>
bool run_core(Handle* h, bool release, F&& f) {
  bool failed = false;
  Error err(ErrorKind::kState, "");
  if (release) {
    Py_BEGIN_ALLOW_THREADS
    try {
      f();
    } catch (const Error& e) {
      failed = true;
      err = e;
    }
    Py_END_ALLOW_THREADS
  } else {
    try {
      f();
    } catch (const Error& e) {
      failed = true;
      err = e;
    }
  }
  if (failed) raise_core_error(h, err);
  return !failed;
}

// timeout: None -> forever (-1), else non-negative float seconds.
bool parse_timeout(Handle* h, PyObject* obj, double* out) {
  if (obj == nullptr || obj == Py_None) {
    *out = -1;
    return true;
  }
  double t = PyFloat_AsDouble(obj);
  if (t == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "torch_shmem: stream %R: timeout must be a number or None",
                 h->name);
    return false;
  }
  if (std::isnan(t) || t < 0) {
    PyErr_Format(PyExc_ValueError,
                 "torch_shmem: stream %R: timeout must be >= 0 or None, got %R", h->name, obj);
    return false;
  }
  *out = t;
  return true;
}

Session session_of(Handle* h) { return Session(*h->s, h->sim); }

// The between-slices hook of blocking calls (core::Interrupt). The GIL is
// released lazily, at the first call, so an uncontended lock or a
// lock-free read never gives it up; each later call retakes it to run
// signal handlers and look at close(), then releases it for the next slice.
struct GilSlices {
  Handle* h;
  PyThreadState* ts = nullptr;
  explicit GilSlices(Handle* handle, bool release_now) : h(handle) {
    if (release_now) ts = PyEval_SaveThread();
  }
  ~GilSlices() { retake(); }
  void retake() {
    if (ts != nullptr) PyEval_RestoreThread(ts);
    ts = nullptr;
  }
  bool operator()() {
    retake();
    if (PyErr_CheckSignals() < 0 || h->closing) return false;
    ts = PyEval_SaveThread();
    return true;
  }
};

bool raise_gone(Handle* h, uint64_t after);

// Runs a blocking session call f(interrupt) and maps how it ended: core
// errors at the choke point, an interrupt by close() as a RuntimeError
// (`closed_while`: what was waiting; null: the handle's closed error), an
// unlinked generation by raise_gone. Returns false with a Python error set.
template <typename F>
bool blocking(Handle* h, bool release_now, F&& f, uint64_t after = 0,
              const char* closed_while = nullptr) {
  Blocked b = Blocked::kDone;
  {
    GilSlices slices(h, release_now);
    try {
      b = f(torch_shmem::core::Interrupt(slices));
    } catch (const Error& e) {
      slices.retake();
      raise_core_error(h, e);
      return false;
    }
  }
  switch (b) {
    case Blocked::kDone:
      return true;
    case Blocked::kGone:
      return raise_gone(h, after);
    case Blocked::kInterrupted:
      if (PyErr_Occurred()) return false;  // a signal handler raised
      if (closed_while == nullptr) {
        closed_error(h);
      } else {
        PyErr_Format(PyExc_RuntimeError,
                     "torch_shmem: stream %R was closed while a read was waiting on this "
                     "handle (%s)",
                     h->name, closed_while);
      }
      return false;
  }
  return false;
}

// Acquires the stream lock, blocking in slices. Returns false with an error.
bool acquire_lock(Handle* h, const Deadline& d) {
  return blocking(h, false,
                  [&](torch_shmem::core::Interrupt i) { return session_of(h).lock_until(d, i); });
}

void unlock_quiet(Handle* h) { torch_shmem::core::LockGuard(*h->s).release(); }

void record_read(Handle* h, const Snapshot& snap) {
  uint64_t missed = snap.count > h->last_read_count + 1 ? snap.count - h->last_read_count - 1 : 0;
  h->missed_writes = missed;
  h->total_missed_writes += missed;
  h->last_read_count = snap.count;
  h->last = snap;
  if (h->notify != nullptr) h->notify->rearm(snap.count);
}

// Consistent snapshot into dst (payload-sized). Returns false with an error.
bool snapshot_into(Handle* h, void* dst, const Deadline& d) {
  Snapshot snap;
  const Session session = session_of(h);
  const bool big = h->nbytes >= kReleaseGilBytes;
  if (!blocking(h, big, [&](torch_shmem::core::Interrupt i) {
        return session.read(dst, false, d, i, &snap);
      }))
    return false;
  record_read(h, snap);
  return true;
}

PyObject* new_payload_array(Handle* h) {
  return PyArray_SimpleNew(h->ndim, h->dims, h->typenum);
}

// Returns 1 if obj is an ndarray with exactly this stream's dtype, shape and
// C-contiguous native layout, 0 otherwise.
int exact_array(Handle* h, PyObject* obj) {
  if (!PyArray_Check(obj)) return 0;
  PyArrayObject* a = reinterpret_cast<PyArrayObject*>(obj);
  if (PyArray_NDIM(a) != h->ndim) return 0;
  int t = PyArray_TYPE(a);
  if (t != h->typenum && !PyArray_EquivTypenums(t, h->typenum)) return 0;
  if (!PyArray_ISNOTSWAPPED(a) || !PyArray_IS_C_CONTIGUOUS(a)) return 0;
  const npy_intp* d = PyArray_DIMS(a);
  for (int i = 0; i < h->ndim; ++i)
    if (d[i] != h->dims[i]) return 0;
  return 1;
}

// A wait for a publication newer than `after` ended because the handle's
// generation was unlinked: StreamReplacedError when the name now holds
// another generation, else StreamUnlinkedError. The name is looked at now,
// when the error is raised.
bool raise_gone(Handle* h, uint64_t after) {
  Stream::NameState state = Stream::NameState::kGone;
  try {
    state = Stream::name_state(h->s->name(), h->s->geometry()->instance_id);
  } catch (const Error&) {
  }
  const auto n = static_cast<unsigned long long>(after);
  if (state == Stream::NameState::kOther)
    PyErr_Format(StreamReplacedError,
                 "torch_shmem: stream %R was unlinked and re-created: the name now holds a new "
                 "generation, and this handle still maps the old one, where a wait for a write "
                 "newer than count %llu would never end; open the new generation with "
                 "torch_shmem.open(%R)",
                 h->name, n, h->name);
  else
    PyErr_Format(StreamUnlinkedError,
                 "torch_shmem: stream %R was unlinked (its producer removed it, or it was "
                 "purged) and nothing has re-created the name yet; a wait for a write newer "
                 "than count %llu would never end; torch_shmem.open(%R, wait=seconds) waits "
                 "for a producer to create it again",
                 h->name, n, h->name);
  return false;
}

bool wait_after(Handle* h, uint64_t after, const Deadline& d, const char* what) {
  return blocking(
      h, true,
      [&](torch_shmem::core::Interrupt i) { return session_of(h).wait_until(after, d, i); },
      after, what);
}

// ---------------------------------------------------------------------------
// Construction
// ---------------------------------------------------------------------------

Handle* wrap(Stream* s, PyObject* name) {
  Handle* h = PyObject_New(Handle, &HandleType);
  if (h == nullptr) {
    delete s;
    return nullptr;
  }
  h->s = s;
  h->sim = nullptr;
  h->notify = nullptr;
  Py_INCREF(name);
  h->name = name;
  // Geometry from the core's validated private copy, never the shared
  // header (another process could change it after validation).
  const auto* hdr = s->geometry();
  h->typenum = dtype_to_typenum(hdr->dtype_code);
  h->ndim = static_cast<int>(hdr->ndim);
  for (int i = 0; i < h->ndim; ++i) h->dims[i] = static_cast<npy_intp>(hdr->shape[i]);
  h->nbytes = hdr->payload_bytes;
  new (&h->inflight) std::atomic<int>(0);
  h->closing = false;
  h->closed = false;
  h->exports = 0;
  h->held_levels = 0;
  h->last = Snapshot();
  h->last_read_count = s->count();
  h->missed_writes = 0;
  h->total_missed_writes = 0;
  return h;
}

bool utf8_name(PyObject* name, std::string* out) {
  if (!PyUnicode_Check(name)) {
    PyErr_Format(PyExc_TypeError, "torch_shmem: stream name must be a str, got %s",
                 Py_TYPE(name)->tp_name);
    return false;
  }
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(name, &n);
  if (p == nullptr) return false;
  out->assign(p, static_cast<size_t>(n));
  if (out->find('\0') != std::string::npos) {
    PyErr_SetString(PyExc_ValueError, "torch_shmem: stream name must not contain NUL");
    return false;
  }
  return true;
}

// create(name, dtype_code, shape, mode, flags, nslots=0). Slotted streams
// can only be created here with CPU slots (FLAG_HOST_SLOTS) or simulated
// device memory (GPU streams are created through torch.ops.shmem).
PyObject* mod_create(PyObject*, PyObject* args) {
  PyObject* name;
  unsigned int code, mode, flags, nslots = 0, ring_policy = 0;
  PyObject* shape;
  if (!PyArg_ParseTuple(args, "UIO!II|II", &name, &code, &PyTuple_Type, &shape, &mode, &flags,
                        &nslots, &ring_policy))
    return nullptr;
  using torch_shmem::core::kFlagGpu;
  using torch_shmem::core::kFlagSimDevice;
  if ((flags & kFlagGpu) && !(flags & kFlagSimDevice)) {
    PyErr_Format(PyExc_ValueError,
                 "torch_shmem: stream %R: GPU streams are created through torch_shmem.ops", name);
    return nullptr;
  }
  std::string n;
  if (!utf8_name(name, &n)) return nullptr;
  CreateOptions g;
  g.dtype_code = code;
  g.mode = mode;
  g.flags = flags;
  Py_ssize_t nd = PyTuple_GET_SIZE(shape);
  if (nd > static_cast<Py_ssize_t>(torch_shmem::core::kMaxDims)) {
    PyErr_Format(PyExc_ValueError, "torch_shmem: stream %R: shape has %zd dimensions; the limit is %u",
                 name, nd, torch_shmem::core::kMaxDims);
    return nullptr;
  }
  g.ndim = static_cast<uint32_t>(nd);
  for (Py_ssize_t i = 0; i < nd; ++i) {
    long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    if (v == -1 && PyErr_Occurred()) return nullptr;
    g.shape[i] = v;
  }
  torch_shmem::core::HostSlotMemory* sim = nullptr;
  if (flags & torch_shmem::core::kFlagHostSlots) g.nslots = nslots;
  g.ring_policy = ring_policy;
  if (flags & kFlagSimDevice) {
    g.nslots = nslots;
    g.init_device = [&](torch_shmem::core::Header* hdr) {
      sim = torch_shmem::core::HostSlotMemory::create(n, hdr->device_bytes, mode);
    };
  }
  Stream* s = nullptr;
  Error err(ErrorKind::kState, "");
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS  // fallocate of a large stream takes a while
  try {
    s = Stream::create(n, g);
  } catch (const Error& e) {
    failed = true;
    err = e;
    if (sim != nullptr) {
      delete sim;
      shm_unlink(torch_shmem::core::sim_device_name(n).c_str());
    }
  }
  Py_END_ALLOW_THREADS
  if (failed) return raise_core_error(nullptr, err);
  Handle* h = wrap(s, name);
  if (h != nullptr && sim != nullptr) {
    sim->set_geometry(s->geometry()->slot_stride, s->geometry()->payload_bytes);
    h->sim = sim;
  }
  return reinterpret_cast<PyObject*>(h);
}

// open(name, readonly)
PyObject* mod_open(PyObject*, PyObject* args) {
  PyObject* name;
  int readonly = 0;
  if (!PyArg_ParseTuple(args, "Up", &name, &readonly)) return nullptr;
  std::string n;
  if (!utf8_name(name, &n)) return nullptr;
  Stream* s = nullptr;
  Error err(ErrorKind::kState, "");
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    s = Stream::open(n, readonly != 0);
  } catch (const Error& e) {
    failed = true;
    err = e;
  }
  Py_END_ALLOW_THREADS
  if (failed) return raise_core_error(nullptr, err);
  if (dtype_to_typenum(s->geometry()->dtype_code) < 0) {
    // A GPU-only dtype: the NumPy path cannot represent it.
    delete s;
    PyErr_Format(PyExc_TypeError, "torch_shmem: stream %R has a dtype NumPy cannot represent",
                 name);
    return nullptr;
  }
  torch_shmem::core::HostSlotMemory* sim = nullptr;
  if (s->geometry()->flags & torch_shmem::core::kFlagSimDevice) {
    try {
      sim = torch_shmem::core::HostSlotMemory::open(n, s->geometry()->device_bytes,
                                                     s->geometry()->instance_id);
    } catch (const Error& e) {
      delete s;
      return raise_core_error(nullptr, e);
    }
    sim->set_geometry(s->geometry()->slot_stride, s->geometry()->payload_bytes);
  }
  Handle* h = wrap(s, name);
  if (h != nullptr) h->sim = sim;
  return reinterpret_cast<PyObject*>(h);
}

PyObject* mod_unlink(PyObject*, PyObject* arg) {
  std::string n;
  if (!utf8_name(arg, &n)) return nullptr;
  try {
    return PyBool_FromLong(Stream::unlink_name(n));
  } catch (const Error& e) {
    return raise_core_error(nullptr, e);
  }
}

// (name, instance_id) arguments: a stream name and a generation's 16-byte
// instance id. False with an exception set when they are not that.
bool parse_name_and_generation(PyObject* args, std::string* n, const char** iid) {
  PyObject* name;
  Py_ssize_t iid_len;
  if (!PyArg_ParseTuple(args, "Uy#", &name, iid, &iid_len)) return false;
  if (iid_len != 16) {
    PyErr_SetString(PyExc_ValueError, "torch_shmem: instance_id must be 16 bytes");
    return false;
  }
  return utf8_name(name, n);
}

// name_state(name, instance_id) -> "gone", "same" or "other": what the name
// holds now compared with the generation instance_id (16 bytes).
PyObject* mod_name_state(PyObject*, PyObject* args) {
  std::string n;
  const char* iid;
  if (!parse_name_and_generation(args, &n, &iid)) return nullptr;
  Stream::NameState state;
  try {
    state = Stream::name_state(n, reinterpret_cast<const uint8_t*>(iid));
  } catch (const Error& e) {
    return raise_core_error(nullptr, e);
  }
  return PyUnicode_FromString(state == Stream::NameState::kGone   ? "gone"
                              : state == Stream::NameState::kSame ? "same"
                                                                  : "other");
}

// unlink_if(name, instance_id) -> "removed", "gone" or "replaced": removes
// the name only while it holds the generation instance_id (16 bytes), see
// Stream::unlink_name_if.
PyObject* mod_unlink_if(PyObject*, PyObject* args) {
  std::string n;
  const char* iid;
  if (!parse_name_and_generation(args, &n, &iid)) return nullptr;
  Stream::UnlinkIf r;
  try {
    r = Stream::unlink_name_if(n, reinterpret_cast<const uint8_t*>(iid));
  } catch (const Error& e) {
    return raise_core_error(nullptr, e);
  }
  return PyUnicode_FromString(r == Stream::UnlinkIf::kRemoved ? "removed"
                              : r == Stream::UnlinkIf::kGone  ? "gone"
                                                              : "replaced");
}

// ---------------------------------------------------------------------------
// Notifier: a readiness descriptor over a pinned header (notify.h), for
// asyncio waits. Independent of any Handle's lifetime; closed by close() or
// when collected. Methods run with the GIL held and never block.
// ---------------------------------------------------------------------------

struct NotifierObject {
  PyObject_HEAD
  torch_shmem::core::Notifier* n;
};

PyTypeObject NotifierType = {PyVarObject_HEAD_INIT(nullptr, 0)};

torch_shmem::core::Notifier* notifier_of(NotifierObject* o) {
  if (o->n == nullptr)
    PyErr_SetString(PyExc_RuntimeError, "torch_shmem: the readiness descriptor is closed");
  return o->n;
}

PyObject* N_fileno(NotifierObject* o, PyObject*) {
  auto* n = notifier_of(o);
  return n == nullptr ? nullptr : PyLong_FromLong(n->fd());
}

PyObject* N_arm(NotifierObject* o, PyObject* arg) {
  auto* n = notifier_of(o);
  if (n == nullptr) return nullptr;
  unsigned long long after = PyLong_AsUnsignedLongLong(arg);
  if (after == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  n->rearm(after);
  Py_RETURN_NONE;
}

PyObject* N_disarm(NotifierObject* o, PyObject*) {
  auto* n = notifier_of(o);
  if (n == nullptr) return nullptr;
  n->disarm();
  Py_RETURN_NONE;
}

PyObject* N_count(NotifierObject* o, PyObject*) {
  auto* n = notifier_of(o);
  return n == nullptr ? nullptr : PyLong_FromUnsignedLongLong(n->count());
}

PyObject* N_unlinked(NotifierObject* o, PyObject*) {
  auto* n = notifier_of(o);
  if (n == nullptr) return nullptr;
  return PyBool_FromLong(n->unlinked());
}

PyObject* N_close(NotifierObject* o, PyObject*) {
  delete o->n;
  o->n = nullptr;
  Py_RETURN_NONE;
}

void N_dealloc(NotifierObject* o) {
  delete o->n;
  o->n = nullptr;
  PyObject_Free(o);
}

PyMethodDef notifier_methods[] = {
    {"fileno", (PyCFunction)N_fileno, METH_NOARGS, "the descriptor (readable when armed and due)"},
    {"arm", (PyCFunction)N_arm, METH_O, "arm(after): readable once count > after"},
    {"disarm", (PyCFunction)N_disarm, METH_NOARGS, "drain and stop signalling until arm()"},
    {"count", (PyCFunction)N_count, METH_NOARGS, "the stream's count"},
    {"unlinked", (PyCFunction)N_unlinked, METH_NOARGS, "whether the generation was unlinked"},
    {"close", (PyCFunction)N_close, METH_NOARGS, "release the descriptor and its table entry"},
    {nullptr, nullptr, 0, nullptr}};

// notifier(name, instance_id) -> Notifier, or None when the name no longer
// holds that generation or its header cannot be mapped writable.
PyObject* mod_notifier(PyObject*, PyObject* args) {
  std::string n;
  const char* iid;
  if (!parse_name_and_generation(args, &n, &iid)) return nullptr;
  std::unique_ptr<torch_shmem::core::Notifier> notifier;
  try {
    int why = 0;
    notifier = torch_shmem::core::Notifier::attach_pinned(
        n, reinterpret_cast<const uint8_t*>(iid), &why);
  } catch (const Error& e) {
    return raise_core_error(nullptr, e);
  }
  if (!notifier) Py_RETURN_NONE;
  NotifierObject* o = PyObject_New(NotifierObject, &NotifierType);
  if (o == nullptr) return nullptr;
  o->n = notifier.release();
  return reinterpret_cast<PyObject*>(o);
}

PyObject* mod_os_name(PyObject*, PyObject* arg) {
  std::string n;
  if (!utf8_name(arg, &n)) return nullptr;
  try {
    std::string os = Stream::os_name(n);
    return PyUnicode_DecodeUTF8(os.data(), static_cast<Py_ssize_t>(os.size()), "strict");
  } catch (const Error& e) {
    return raise_core_error(nullptr, e);
  }
}

// ---------------------------------------------------------------------------
// Handle methods
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Rings (csrc/core/ring.h)
// ---------------------------------------------------------------------------

PyObject* read_target(Handle* h, PyObject* out);

bool is_ring(Handle* h) { return torch_shmem::core::is_ring(h->s->geometry()); }

// A write or clear of a ring: the policy, the publication and the lock in
// one blocking session call. Returns the count, or 0 when drop_newest
// dropped the write. at > count + 1: publication `at`, skipping the counts
// in between (CPU rings; Session::ring_write).
PyObject* ring_publish(Handle* h, const void* src, bool has_fid, uint64_t fid, double timeout,
                       uint64_t at = 0) {
  uint64_t count = 0;
  const Deadline d = Deadline::after(timeout);
  if (!blocking(h, h->nbytes >= kReleaseGilBytes, [&](torch_shmem::core::Interrupt i) {
        return session_of(h).ring_write(src, has_fid, fid, d, i, &count, false, at);
      }))
    return nullptr;
  return PyLong_FromUnsignedLongLong(count);
}

bool require_ring(Handle* h) {
  if (is_ring(h)) return true;
  PyErr_Format(PyExc_RuntimeError,
               "torch_shmem: stream %R is not a ring; cursors need a stream created with "
               "torch_shmem.create(..., ring=N)",
               h->name);
  return false;
}

bool parse_cursor(Handle* h, PyObject* obj, uint32_t* index) {
  long v = PyLong_AsLong(obj);
  if (v == -1 && PyErr_Occurred()) return false;
  if (v < 0 || v >= static_cast<long>(torch_shmem::core::kMaxCursors)) {
    PyErr_Format(PyExc_ValueError, "torch_shmem: stream %R: invalid cursor index %ld", h->name, v);
    return false;
  }
  *index = static_cast<uint32_t>(v);
  return true;
}

// cursor_attach(name, timeout=None) -> index (takes the lock briefly)
PyObject* H_cursor_attach(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "cursor_attach(name, timeout=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok || !require_ring(h)) return nullptr;
  std::string cname;
  if (!utf8_name(args[0], &cname)) return nullptr;
  double timeout = -1;
  if (nargs >= 2 && !parse_timeout(h, args[1], &timeout)) return nullptr;
  uint32_t index = 0;
  const Deadline d = Deadline::after(timeout);
  if (!blocking(h, false, [&](torch_shmem::core::Interrupt i) {
        return session_of(h).ring_attach(cname, d, i, &index);
      }))
    return nullptr;
  return PyLong_FromUnsignedLong(index);
}

// cursor_detach(index): releases the cursor if this process owns it.
PyObject* H_cursor_detach(Handle* h, PyObject* arg) {
  Guard g(h, true);
  if (!g.ok || !require_ring(h)) return nullptr;
  uint32_t index;
  if (!parse_cursor(h, arg, &index)) return nullptr;
  torch_shmem::core::ring_detach(*h->s, index);
  Py_RETURN_NONE;
}

// cursor_consumed(index) -> count of the cursor's last consumed publication
PyObject* H_cursor_consumed(Handle* h, PyObject* arg) {
  Guard g(h);
  if (!g.ok || !require_ring(h)) return nullptr;
  uint32_t index;
  if (!parse_cursor(h, arg, &index)) return nullptr;
  return PyLong_FromUnsignedLongLong(
      torch_shmem::core::ring_cursor(*h->s, index)->consumed.load(std::memory_order_acquire));
}

// cursor_advance(index, to) -> the cursor's consumed count afterwards.
// Moves a cursor this process holds forward to `to` (never back): a
// consumer that read publications with ring_read_at and is now done with
// them (the bridge, once they are acknowledged), and wakes a writer
// waiting for room.
PyObject* H_cursor_advance(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "cursor_advance(index, to)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok || !require_ring(h)) return nullptr;
  uint32_t index;
  if (!parse_cursor(h, args[0], &index)) return nullptr;
  const unsigned long long to = PyLong_AsUnsignedLongLong(args[1]);
  if (to == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  auto* cur = torch_shmem::core::ring_cursor(*h->s, index);
  if (cur->owner_pid.load(std::memory_order_acquire) != static_cast<int32_t>(getpid())) {
    PyErr_Format(PyExc_RuntimeError,
                 "torch_shmem: stream %R: cursor %u is not held by this process (closed, or "
                 "released)", h->name, index);
    return nullptr;
  }
  const uint64_t count = h->s->seq() >> 1;
  if (to > count) {
    PyErr_Format(PyExc_ValueError,
                 "torch_shmem: stream %R: cannot advance a cursor to %llu, past count %llu",
                 h->name, to, static_cast<unsigned long long>(count));
    return nullptr;
  }
  uint64_t consumed = cur->consumed.load(std::memory_order_acquire);
  // seq_cst CAS: the reader's half of the Dekker pair with a writer blocked
  // for room, as in read_next
  while (consumed < to &&
         !cur->consumed.compare_exchange_weak(consumed, to, std::memory_order_seq_cst)) {
  }
  if (consumed < to) {
    torch_shmem::core::ring_wake_writers(*h->s);
    consumed = to;
  }
  return PyLong_FromUnsignedLongLong(consumed);
}

// ring_read_at(c, out=None) -> (ndarray, count, write_time_ns, frame_id), or
// None when publication c is no longer in the ring (overwritten by a later
// count, or skipped). CPU rings; c in 1..count. Moves no cursor: whoever
// holds a cursor below c under block or drop_newest keeps the slot intact.
PyObject* H_ring_read_at(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "ring_read_at(c, out=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok || !require_ring(h)) return nullptr;
  if (h->s->host_slots() == nullptr) {
    PyErr_Format(PyExc_RuntimeError, "torch_shmem: stream %R: ring_read_at is for CPU rings",
                 h->name);
    return nullptr;
  }
  const unsigned long long c = PyLong_AsUnsignedLongLong(args[0]);
  if (c == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  const uint64_t count = h->s->seq() >> 1;
  if (c == 0 || c > count) {
    PyErr_Format(PyExc_ValueError,
                 "torch_shmem: stream %R: publication %llu is not in 1..count (%llu)", h->name, c,
                 static_cast<unsigned long long>(count));
    return nullptr;
  }
  PyObject* result = read_target(h, nargs >= 2 ? args[1] : Py_None);
  if (result == nullptr) return nullptr;
  void* dst = PyArray_DATA(reinterpret_cast<PyArrayObject*>(result));
  Snapshot snap;
  bool got = false;
  if (!run_core(h, h->nbytes >= kReleaseGilBytes, [&] {
        got = !torch_shmem::core::ring_passed(*h->s, c) &&
              torch_shmem::core::ring_copy(*h->s, c, dst, &snap);
      })) {
    Py_DECREF(result);
    return nullptr;
  }
  if (!got) {
    Py_DECREF(result);
    Py_RETURN_NONE;
  }
  return Py_BuildValue("(NKLK)", result, static_cast<unsigned long long>(snap.count),
                       static_cast<long long>(snap.write_time_ns),
                       static_cast<unsigned long long>(snap.frame_id));
}

// read_next(index, out=None, timeout=None)
//   -> (ndarray, count, write_time_ns, frame_id, missed)
PyObject* H_read_next(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 3) {
    PyErr_SetString(PyExc_TypeError, "read_next(index, out=None, timeout=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok || !require_ring(h)) return nullptr;
  uint32_t index;
  if (!parse_cursor(h, args[0], &index)) return nullptr;
  PyObject* out = nargs >= 2 ? args[1] : Py_None;
  double timeout = -1;
  if (nargs >= 3 && !parse_timeout(h, args[2], &timeout)) return nullptr;
  PyObject* result = read_target(h, out);
  if (result == nullptr) return nullptr;
  void* dst = PyArray_DATA(reinterpret_cast<PyArrayObject*>(result));
  Snapshot snap;
  uint64_t missed = 0;
  const Deadline d = Deadline::after(timeout);
  const uint64_t after = torch_shmem::core::ring_cursor(*h->s, index)->consumed.load();
  // GIL released at once: the wait may park (as read_after's).
  if (!blocking(
          h, true,
          [&](torch_shmem::core::Interrupt i) {
            return session_of(h).ring_next(index, dst, d, i, &snap, &missed);
          },
          after, "read_next")) {
    Py_DECREF(result);
    return nullptr;
  }
  return Py_BuildValue("(NKLKK)", result, static_cast<unsigned long long>(snap.count),
                       static_cast<long long>(snap.write_time_ns),
                       static_cast<unsigned long long>(snap.frame_id),
                       static_cast<unsigned long long>(missed));
}

// ring_info() -> (nslots, policy, drops, ((index, name, owner_pid, last_pid,
//                 alive, consumed, missed), ...)); None for other streams.
PyObject* H_ring_info(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  if (!is_ring(h)) Py_RETURN_NONE;
  const auto* geo = h->s->geometry();
  auto cursors = torch_shmem::core::ring_cursors(*h->s);
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(cursors.size()));
  if (t == nullptr) return nullptr;
  for (size_t i = 0; i < cursors.size(); ++i) {
    const auto& c = cursors[i];
    PyObject* v = Py_BuildValue(
        "(Is#iiOKK)", c.index, c.name.data(), static_cast<Py_ssize_t>(c.name.size()),
        c.owner_pid, c.last_pid, c.alive ? Py_True : Py_False,
        static_cast<unsigned long long>(c.consumed), static_cast<unsigned long long>(c.missed));
    if (v == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), v);
  }
  return Py_BuildValue(
      "(IIKN)", geo->nslots, geo->ring_policy,
      static_cast<unsigned long long>(
          torch_shmem::core::ring_control(*h->s)->drops.load(std::memory_order_relaxed)),
      t);
}

// write(value, frame_id=None, timeout=None, at=None) -> count, or
// NotImplemented when value is not an exact-match ndarray (the Python layer
// converts and calls again). at (rings only): publish at count `at` when it
// is past the next count, skipping the counts in between (a GPU ring
// publishes the next count); 0 is returned when drop_newest dropped it.
PyObject* H_write(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 4) {
    PyErr_SetString(PyExc_TypeError, "write(value, frame_id=None, timeout=None, at=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok) return nullptr;
  if (h->s->readonly()) {
    PyErr_Format(PyExc_PermissionError, "torch_shmem: stream %R is open read-only", h->name);
    return nullptr;
  }
  if (!exact_array(h, args[0])) Py_RETURN_NOTIMPLEMENTED;
  bool has_fid = false;
  unsigned long long fid = 0;
  if (nargs >= 2 && args[1] != Py_None) {
    fid = PyLong_AsUnsignedLongLong(args[1]);
    if (fid == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError,
                   "torch_shmem: stream %R: frame_id must be an int in [0, 2**64), got %R",
                   h->name, args[1]);
      return nullptr;
    }
    has_fid = true;
  }
  double timeout = -1;
  if (nargs >= 3 && !parse_timeout(h, args[2], &timeout)) return nullptr;
  unsigned long long at = 0;
  if (nargs >= 4 && args[3] != Py_None) {
    at = PyLong_AsUnsignedLongLong(args[3]);
    if (at == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
    if (at >= (1ULL << 63)) {
      PyErr_Format(PyExc_ValueError, "torch_shmem: stream %R: a write at count %llu: the count "
                   "must be below 2**63", h->name, at);
      return nullptr;
    }
  }
  const void* src = PyArray_DATA(reinterpret_cast<PyArrayObject*>(args[0]));
  if (is_ring(h)) return ring_publish(h, src, has_fid, fid, timeout, at);
  const Session session = session_of(h);
  if (at != 0 && session.slots() != nullptr) {
    PyErr_Format(PyExc_ValueError, "torch_shmem: stream %R: write(at=) is for CPU streams",
                 h->name);
    return nullptr;
  }
  if (!acquire_lock(h, Deadline::after(timeout))) return nullptr;
  uint64_t count = 0;
  bool ok = run_core(h, h->nbytes >= kReleaseGilBytes,
                     [&] { count = session.write_locked(src, false, has_fid, fid, at); });
  unlock_quiet(h);
  if (!ok) return nullptr;
  return PyLong_FromUnsignedLongLong(count);
}

// The result array of a read: a new payload-sized array, or `out` after
// checking it is a writeable exact match. Returns a new reference or null.
PyObject* read_target(Handle* h, PyObject* out) {
  if (out == Py_None) return new_payload_array(h);
  if (!exact_array(h, out) || !PyArray_ISWRITEABLE(reinterpret_cast<PyArrayObject*>(out))) {
    PyErr_Format(PyExc_ValueError,
                 "torch_shmem: stream %R: out must be a writeable C-contiguous ndarray "
                 "of the stream's shape and dtype",
                 h->name);
    return nullptr;
  }
  Py_INCREF(out);
  return out;
}

// With kPub, a read returns (array, count, write_time_ns, frame_id, missed):
// the metadata of exactly the snapshot copied, as recorded by record_read.
// The tuple is built before the GIL can be released again, so another
// thread reading through the same handle cannot interleave its snapshot.
template <bool kPub>
PyObject* read_result(Handle* h, PyObject* array) {
  if (!kPub) return array;
  return Py_BuildValue("(NKLKK)", array, static_cast<unsigned long long>(h->last.count),
                       static_cast<long long>(h->last.write_time_ns),
                       static_cast<unsigned long long>(h->last.frame_id),
                       static_cast<unsigned long long>(h->missed_writes));
}

// read(out=None, timeout=None) -> ndarray
// read_pub(out=None, timeout=None) -> (ndarray, count, write_time_ns, frame_id, missed)
template <bool kPub>
PyObject* H_read_impl(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  Guard g(h);
  if (!g.ok) return nullptr;
  PyObject* out = nargs >= 1 ? args[0] : Py_None;
  double timeout = -1;
  if (nargs >= 2 && !parse_timeout(h, args[1], &timeout)) return nullptr;
  PyObject* result = read_target(h, out);
  if (result == nullptr) return nullptr;
  if (!snapshot_into(h, PyArray_DATA(reinterpret_cast<PyArrayObject*>(result)),
                     Deadline::after(timeout))) {
    Py_DECREF(result);
    return nullptr;
  }
  return read_result<kPub>(h, result);
}

// `after` of the waiting calls: a count, or < 0 for the count now.
bool parse_after(Handle* h, PyObject* obj, uint64_t* out) {
  long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) return false;
  *out = v < 0 ? h->s->count() : static_cast<uint64_t>(v);
  return true;
}

// read_after(after, out=None, timeout=None) -> ndarray: blocks until
// count > after (level-triggered), then takes a snapshot. after=-1 means
// "the count at entry" (read_new's edge-triggered semantics).
// read_after_pub(...) returns the tuple of read_pub.
template <bool kPub>
PyObject* H_read_after_impl(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "read_after(after, out=None, timeout=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok) return nullptr;
  uint64_t after;
  if (!parse_after(h, args[0], &after)) return nullptr;
  PyObject* out = nargs >= 2 ? args[1] : Py_None;
  double timeout = -1;
  if (nargs >= 3 && !parse_timeout(h, args[2], &timeout)) return nullptr;
  PyObject* result = read_target(h, out);
  if (result == nullptr) return nullptr;
  const Deadline d = Deadline::after(timeout);
  if (!wait_after(h, after, d, "read_new/read_after") ||
      !snapshot_into(h, PyArray_DATA(reinterpret_cast<PyArrayObject*>(result)), d)) {
    Py_DECREF(result);
    return nullptr;
  }
  return read_result<kPub>(h, result);
}

PyObject* H_read(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  return H_read_impl<false>(h, args, nargs);
}
PyObject* H_read_pub(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  return H_read_impl<true>(h, args, nargs);
}
PyObject* H_read_after(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  return H_read_after_impl<false>(h, args, nargs);
}
PyObject* H_read_after_pub(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  return H_read_after_impl<true>(h, args, nargs);
}

// True when the calling thread holds the stream's lock; otherwise sets
// RuntimeError (for the calls that require it) and returns false.
bool lock_held(Handle* h) {
  if (h->s->held_depth() > 0) return true;
  PyErr_Format(PyExc_RuntimeError, "torch_shmem: stream %R: the write lock is not held", h->name);
  return false;
}

// note_count(count): records a read of publication `count` made without
// this handle (a GPU handle's device read through torch.ops.shmem, which
// leaves the count in its token), so the read statistics (last_read_count,
// missed_writes) are kept as a snapshot read keeps them. The metadata is
// that of the header when `count` is still the latest publication, else 0.
PyObject* H_note_count(Handle* h, PyObject* arg) {
  Guard g(h);
  if (!g.ok) return nullptr;
  const unsigned long long c = PyLong_AsUnsignedLongLong(arg);
  if (c == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  const auto* hdr = h->s->header();
  Snapshot snap;
  snap.count = c;
  snap.seq = 2 * static_cast<uint64_t>(c);
  const uint64_t s1 = hdr->seq.load(std::memory_order_acquire);
  const int64_t t = hdr->write_time_ns.load(std::memory_order_relaxed);
  const uint64_t f = hdr->frame_id.load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  if (s1 == snap.seq && hdr->seq.load(std::memory_order_relaxed) == s1) {
    snap.write_time_ns = t;
    snap.frame_id = f;
  }
  record_read(h, snap);
  Py_RETURN_NONE;
}

// note_read() -> (count, write_time_ns, frame_id, missed): records the
// current publication as read by this handle, for reads of the live payload
// (read(safe=False)). The caller holds the lock, so the metadata is stable.
PyObject* H_note_read(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  if (!lock_held(h)) return nullptr;
  const auto* hdr = h->s->header();
  Snapshot snap;
  snap.seq = hdr->seq.load(std::memory_order_acquire);
  snap.count = snap.seq >> 1;
  snap.write_time_ns = hdr->write_time_ns.load(std::memory_order_relaxed);
  snap.frame_id = hdr->frame_id.load(std::memory_order_relaxed);
  record_read(h, snap);
  return Py_BuildValue("(KLKK)", static_cast<unsigned long long>(snap.count),
                       static_cast<long long>(snap.write_time_ns),
                       static_cast<unsigned long long>(snap.frame_id),
                       static_cast<unsigned long long>(h->missed_writes));
}

// wait_for_count(after, timeout=None) -> count
PyObject* H_wait_for_count(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "wait_for_count(after, timeout=None)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok) return nullptr;
  uint64_t after;
  if (!parse_after(h, args[0], &after)) return nullptr;
  double timeout = -1;
  if (nargs >= 2 && !parse_timeout(h, args[1], &timeout)) return nullptr;
  if (!wait_after(h, after, Deadline::after(timeout), "wait_for_count")) return nullptr;
  return PyLong_FromUnsignedLongLong(h->s->count());
}

PyObject* H_clear(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  Guard g(h);
  if (!g.ok) return nullptr;
  if (h->s->readonly()) {
    PyErr_Format(PyExc_PermissionError, "torch_shmem: stream %R is open read-only", h->name);
    return nullptr;
  }
  double timeout = -1;
  if (nargs >= 1 && !parse_timeout(h, args[0], &timeout)) return nullptr;
  if (is_ring(h)) {
    std::vector<uint8_t> zeros(h->nbytes);
    return ring_publish(h, zeros.data(), false, 0, timeout);
  }
  if (!acquire_lock(h, Deadline::after(timeout))) return nullptr;
  uint64_t count = 0;
  const Session session = session_of(h);
  bool ok = run_core(h, h->nbytes >= kReleaseGilBytes, [&] { count = session.clear_locked(); });
  unlock_quiet(h);
  if (!ok) return nullptr;
  return PyLong_FromUnsignedLongLong(count);
}

PyObject* H_acquire(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  Guard g(h);
  if (!g.ok) return nullptr;
  double timeout = -1;
  if (nargs >= 1 && !parse_timeout(h, args[0], &timeout)) return nullptr;
  if (!acquire_lock(h, Deadline::after(timeout))) return nullptr;
  h->held_levels += 1;
  Py_RETURN_NONE;
}

PyObject* H_release(Handle* h, PyObject*) {
  Guard g(h, true);
  if (!g.ok) return nullptr;
  try {
    h->s->unlock();
  } catch (const Error& e) {
    return raise_core_error(h, e);
  }
  if (h->held_levels > 0) h->held_levels -= 1;
  Py_RETURN_NONE;
}

PyObject* H_held_depth(Handle* h, PyObject*) {
  Guard g(h, true);
  if (!g.ok) return nullptr;
  return PyLong_FromLong(h->s->held_depth());
}

// The slots of a slotted CPU stream are mapped read-only in a read-only
// handle: in-place writes through it are refused (PermissionError) before
// they touch them.
bool slotted_writable(Handle* h) {
  if ((h->s->geometry()->flags & torch_shmem::core::kFlagHostSlots) && h->s->readonly()) {
    PyErr_Format(PyExc_PermissionError, "torch_shmem: stream %R is open read-only", h->name);
    return false;
  }
  return true;
}

// begin_write() / commit_write(frame_id=None) / abort_write(): the caller
// holds the lock (checked here).
// begin_write(at=None, whole=False): opens the in-place write window of the
// next publication, or of publication `at` (> count); `whole`: the caller
// overwrites every byte (a slotted stream's slot is not pre-filled with the
// latest publication). See Stream::begin_write_locked.
PyObject* H_begin_write(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  Guard g(h, true);  // also marks an aborted view torn (see _commit_view)
  if (!g.ok) return nullptr;
  unsigned long long at = 0;
  bool whole = false;
  if (nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "begin_write(at=None, whole=False)");
    return nullptr;
  }
  if (nargs == 2) {
    const int t = PyObject_IsTrue(args[1]);
    if (t < 0) return nullptr;
    whole = t != 0;
  }
  if (nargs >= 1 && args[0] != Py_None) {
    at = PyLong_AsUnsignedLongLong(args[0]);
    if (at == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
    if (at == 0 || at >= (1ULL << 63)) {
      PyErr_Format(PyExc_ValueError, "torch_shmem: stream %R: a write at count %llu: the count "
                   "must be from 1 to 2**63 - 1", h->name, at);
      return nullptr;
    }
  }
  if (!lock_held(h)) return nullptr;
  if (h->s->geometry()->flags & torch_shmem::core::kFlagGpu) {
    PyErr_Format(PyExc_RuntimeError,
                 "torch_shmem: stream %R is a GPU stream: in-place write views are not "
                 "supported; publish with write()",
                 h->name);
    return nullptr;
  }
  if (!slotted_writable(h)) return nullptr;
  if (is_ring(h)) {
    PyErr_Format(PyExc_RuntimeError,
                 "torch_shmem: stream %R is a ring: in-place write views are not supported; "
                 "publish with write()",
                 h->name);
    return nullptr;
  }
  try {
    h->s->begin_write_locked(at, whole);
  } catch (const Error& e) {
    return raise_core_error(h, e);
  }
  Py_RETURN_NONE;
}

PyObject* H_commit_write(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  Guard g(h, true);
  if (!g.ok) return nullptr;
  if (!lock_held(h)) return nullptr;
  bool has_fid = false;
  unsigned long long fid = 0;
  if (nargs >= 1 && args[0] != Py_None) {
    fid = PyLong_AsUnsignedLongLong(args[0]);
    if (fid == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
    has_fid = true;
  }
  if (!slotted_writable(h)) return nullptr;
  return PyLong_FromUnsignedLongLong(h->s->commit_write_locked(has_fid, fid));
}

PyObject* H_abort_write(Handle* h, PyObject*) {
  Guard g(h, true);
  if (!g.ok) return nullptr;
  h->s->abort_write_locked();
  Py_RETURN_NONE;
}

// close(timeout): wakes this handle's blocked callers, waits for in-flight
// calls to leave, then unmaps (deferred while unsafe views are alive).
PyObject* H_close(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (h->closed) Py_RETURN_NONE;
  double timeout = 5.0;
  if (nargs >= 1 && args[0] != Py_None) {
    timeout = PyFloat_AsDouble(args[0]);
    if (timeout == -1.0 && PyErr_Occurred()) return nullptr;
  }
  h->closing = true;
  // Wait for in-flight calls to leave and for lock levels other threads took
  // through this handle to be released (the caller's own were released by
  // SharedMemory.close()); new calls are refused meanwhile.
  if (h->inflight.load(std::memory_order_acquire) > 0 || h->held_levels > 0) {
    const Deadline d = Deadline::after(timeout);
    Stream* s = h->s;
    while (h->inflight.load(std::memory_order_acquire) > 0 || h->held_levels > 0) {
      if (h->inflight.load(std::memory_order_acquire) > 0) s->wake_all();
      if (d.passed()) {
        h->closing = false;
        if (h->inflight.load(std::memory_order_acquire) > 0)
          PyErr_Format(PyExc_RuntimeError,
                       "torch_shmem: cannot close stream %R: %d call(s) on this handle did "
                       "not finish within %s s",
                       h->name, h->inflight.load(), Seconds(timeout).text);
        else
          PyErr_Format(PyExc_RuntimeError,
                       "torch_shmem: cannot close stream %R: another thread owns its lock "
                       "through this handle (not released within %s s)",
                       h->name, Seconds(timeout).text);
        return nullptr;
      }
      // Let the woken threads take the GIL and leave.
      Py_BEGIN_ALLOW_THREADS
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, nullptr);
      Py_END_ALLOW_THREADS
    }
  }
  h->closed = true;
  delete h->notify;  // while the header is still mapped
  h->notify = nullptr;
  if (h->exports == 0) h->s->unmap();
  // No call is in flight and device slots are never exported: unmap the
  // simulated device memory now (which also clears its importer entry).
  delete h->sim;
  h->sim = nullptr;
  Py_RETURN_NONE;
}

// Named result types (PyStructSequence: tuples with named fields, so code
// that indexes or unpacks them keeps working). Field lists are documented
// in the module docstring.
PyStructSequence_Field info_fields[] = {
    {"dtype_code", "header dtype code (see DTYPES)"},
    {"shape", "tuple of ints"},
    {"nbytes", "payload bytes"},
    {"flags", "FLAG_* bits"},
    {"creator_pid", "pid of the creating process"},
    {"instance_id", "16 bytes naming this generation of the name"},
    {"create_time", "creation time, seconds since the epoch"},
    {"mode", "permission bits"},
    {"nslots", "payload slots (1: a single payload; attribute only)"},
    {"device_index", "CUDA device of a GPU stream's slots (0 otherwise; attribute only)"},
    {nullptr, nullptr}};
PyStructSequence_Field state_fields[] = {
    {"seq", "2 * count, odd while a write is in progress"},
    {"write_time_ns", "time of the latest publication (ns since the epoch)"},
    {"frame_id", "frame_id of the latest publication"},
    {"broken", "1 when the payload is torn"},
    {"unlinked", "1 once the generation was unlinked"},
    {"owner_pid", "pid of the last lock owner"},
    {"owner_tid", "thread id of the last lock owner"},
    {"waiters", "readers parked on the futex"},
    {"armed_readers", "readiness descriptors armed for the next publication (attribute only)"},
    {"live_slot", "slotted streams: 1 + the slot pinned by a live view, or 0 (attribute only)"},
    {"slot_contention", "slotted streams: 1 once a read overlapped a write (attribute only)"},
    {nullptr, nullptr}};
PyStructSequence_Field read_stats_fields[] = {
    {"last_read_count", "count of the publication this handle read last"},
    {"missed_writes", "publications skipped by the latest read"},
    {"total_missed_writes", "publications skipped by all reads"},
    {"last_count", "count of the latest snapshot's publication"},
    {"last_write_time_ns", "write time of that publication"},
    {"last_frame_id", "frame_id of that publication"},
    {nullptr, nullptr}};
PyStructSequence_Desc info_desc = {"torch_shmem._core.Info",
                                   "Identity and geometry of a stream (Handle.info()).",
                                   info_fields, 8};
PyStructSequence_Desc state_desc = {"torch_shmem._core.State",
                                    "Publication and lock state of a stream (Handle.state()).",
                                    state_fields, 8};
PyStructSequence_Desc read_stats_desc = {
    "torch_shmem._core.ReadStats", "This handle's read bookkeeping (Handle.read_stats()).",
    read_stats_fields, 6};
PyTypeObject* InfoType = nullptr;
PyTypeObject* StateType = nullptr;
PyTypeObject* ReadStatsType = nullptr;

// A new instance of struct sequence type t holding `items` (new
// references, stolen; any null fails the whole and releases the rest).
PyObject* struct_of(PyTypeObject* t, std::initializer_list<PyObject*> items) {
  PyObject* r = PyStructSequence_New(t);
  bool ok = r != nullptr;
  Py_ssize_t i = 0;
  for (PyObject* v : items) {
    if (v == nullptr) ok = false;
    if (ok)
      PyStructSequence_SET_ITEM(r, i++, v);
    else
      Py_XDECREF(v);
  }
  if (!ok) {
    Py_XDECREF(r);
    return nullptr;
  }
  return r;
}

PyObject* u64(uint64_t v) { return PyLong_FromUnsignedLongLong(v); }
PyObject* i64(int64_t v) { return PyLong_FromLongLong(v); }

// info() -> Info(dtype_code, shape, nbytes, flags, creator_pid, instance_id,
//                create_time, mode)
PyObject* H_info(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  const auto* hdr = h->s->geometry();  // validated copy (see wrap)
  PyObject* shape = PyTuple_New(h->ndim);
  if (shape == nullptr) return nullptr;
  for (int i = 0; i < h->ndim; ++i)
    PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(static_cast<long long>(h->dims[i])));
  return struct_of(InfoType,
                   {PyLong_FromUnsignedLong(hdr->dtype_code), shape, u64(hdr->payload_bytes),
                    PyLong_FromUnsignedLong(hdr->flags), PyLong_FromLong(hdr->creator_pid),
                    PyBytes_FromStringAndSize(reinterpret_cast<const char*>(hdr->instance_id), 16),
                    PyFloat_FromDouble(hdr->create_time_ns * 1e-9),
                    PyLong_FromUnsignedLong(hdr->mode),
                    PyLong_FromUnsignedLong(hdr->nslots == 0 ? 1 : hdr->nslots),
                    PyLong_FromUnsignedLong(hdr->device_index)});
}

// state() -> State(seq, write_time_ns, frame_id, broken, unlinked, owner_pid,
//                  owner_tid, waiters)
PyObject* H_state(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  const auto* hdr = h->s->header();
  return struct_of(StateType, {u64(hdr->seq.load(std::memory_order_acquire)),
                               i64(hdr->write_time_ns.load(std::memory_order_relaxed)),
                               u64(hdr->frame_id.load(std::memory_order_relaxed)),
                               PyLong_FromUnsignedLong(hdr->broken.load()),
                               PyLong_FromUnsignedLong(hdr->unlinked.load()),
                               PyLong_FromLong(hdr->owner_pid.load()),
                               PyLong_FromLong(hdr->owner_tid.load()),
                               PyLong_FromUnsignedLong(hdr->waiters.load()),
                               PyLong_FromUnsignedLong(hdr->armed_readers.load()),
                               PyLong_FromUnsignedLong(h->s->live_slot()),
                               PyLong_FromUnsignedLong(hdr->slot_contention.load())});
}

// importers() -> tuple of pids: the live processes other than the creator
// that map a GPU stream's device memory (empty for CPU streams). A writable
// handle also clears the entries of dead processes.
PyObject* H_importers(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  std::vector<int32_t> pids =
      torch_shmem::core::live_importer_pids(h->s->header(), !h->s->readonly());
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(pids.size()));
  if (t == nullptr) return nullptr;
  for (size_t i = 0; i < pids.size(); ++i) {
    PyObject* v = PyLong_FromLong(pids[i]);
    if (v == nullptr) {
      Py_DECREF(t);
      return nullptr;
    }
    PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), v);
  }
  return t;
}

PyObject* H_count(Handle* h, PyObject*) {
  if (h->closed || h->closing) return closed_error(h);
  return PyLong_FromUnsignedLongLong(h->s->count());
}

// _wait_spin() -> (spin_seconds, gap_ns): what a wait starting now would
// spin before parking (Session::wait_spin, which first shows the latest
// publication to the handle's gap estimator), and the estimated gap between
// publications (None while unknown). For tests of the adaptive wait.
PyObject* H_wait_spin(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  double spin = 0;
  try {
    spin = session_of(h).wait_spin();
  } catch (const Error& e) {
    return raise_core_error(h, e);
  }
  const double gap = h->s->gaps().gap_ns();
  if (gap < 0) return Py_BuildValue("(dO)", spin, Py_None);
  return Py_BuildValue("(dd)", spin, gap);
}

PyObject* H_seq(Handle* h, PyObject*) {
  if (h->closed) return closed_error(h);  // a finishing call (see Guard)
  return PyLong_FromUnsignedLongLong(h->s->seq());
}

// read_stats() -> ReadStats(last_read_count, missed_writes, total_missed_writes,
//                           last_count, last_write_time_ns, last_frame_id)
PyObject* H_read_stats(Handle* h, PyObject*) {
  if (h->closed) return closed_error(h);
  return struct_of(ReadStatsType, {u64(h->last_read_count), u64(h->missed_writes),
                                   u64(h->total_missed_writes), u64(h->last.count),
                                   i64(h->last.write_time_ns), u64(h->last.frame_id)});
}

// sim_wait_count(n, timeout) -> bool: the host form of a GPU stream's
// device-side wait (SlotMemory::queue_wait_count) on simulated device
// memory; True once the device count is >= n, False after timeout seconds.
PyObject* H_sim_wait_count(Handle* h, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "sim_wait_count(n, timeout)");
    return nullptr;
  }
  Guard g(h);
  if (!g.ok) return nullptr;
  if (h->sim == nullptr) {
    PyErr_Format(PyExc_RuntimeError,
                 "torch_shmem: stream %R has no simulated device memory", h->name);
    return nullptr;
  }
  unsigned long long n = PyLong_AsUnsignedLongLong(args[0]);
  if (n == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  double timeout = 0;
  if (!parse_timeout(h, args[1], &timeout)) return nullptr;
  bool ok = false;
  auto* sim = h->sim;
  if (!run_core(h, true, [&] { ok = sim->queue_wait_count(n, timeout); })) return nullptr;
  return PyBool_FromLong(ok);
}

PyObject* H_get_closed(Handle* h, void*) { return PyBool_FromLong(h->closed || h->closing); }
PyObject* H_get_readonly(Handle* h, void*) {
  return PyBool_FromLong(h->s != nullptr && h->s->readonly());
}
PyObject* H_get_name(Handle* h, void*) {
  Py_INCREF(h->name);
  return h->name;
}

// Buffer protocol: the live payload, for unsafe (locked) views. Each export
// keeps the mapping alive even past close().
int H_getbuffer(Handle* h, Py_buffer* view, int flags) {
  if (h->closed || h->closing || !h->s->mapped()) {
    closed_error(h);
    view->obj = nullptr;
    return -1;
  }
  if (h->s->geometry()->flags & torch_shmem::core::kFlagGpu) {
    // The payload lives in device slots; a CPU mirror is written by the
    // slot protocol only, so no writable live view of it is handed out.
    PyErr_Format(PyExc_RuntimeError,
                 "torch_shmem: stream %R is a GPU stream: it has no live CPU payload view",
                 h->name);
    view->obj = nullptr;
    return -1;
  }
  int ro = h->s->readonly() ? 1 : 0;
  if (PyBuffer_FillInfo(view, reinterpret_cast<PyObject*>(h), h->s->payload(),
                        static_cast<Py_ssize_t>(h->nbytes), ro, flags) < 0)
    return -1;
  h->exports += 1;
  return 0;
}

// live_array() -> ndarray of the stream's shape and dtype over the live
// payload. Its base is a memoryview of the handle, i.e. one buffer export
// (H_getbuffer's checks apply), which keeps the mapping alive past close().
// The same as np.frombuffer(handle, dtype).reshape(shape), at a fraction of
// the per-call cost (it runs once per locked in-place access).
PyObject* H_live_array(Handle* h, PyObject*) {
  PyObject* mv = PyMemoryView_FromObject(reinterpret_cast<PyObject*>(h));
  if (mv == nullptr) return nullptr;
  Py_buffer* buf = PyMemoryView_GET_BUFFER(mv);
  PyArray_Descr* descr = PyArray_DescrFromType(h->typenum);
  if (descr == nullptr) {
    Py_DECREF(mv);
    return nullptr;
  }
  int flags = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | (buf->readonly ? 0 : NPY_ARRAY_WRITEABLE);
  PyObject* arr = PyArray_NewFromDescr(&PyArray_Type, descr, h->ndim, h->dims, nullptr, buf->buf,
                                       flags, nullptr);  // steals descr
  if (arr == nullptr) {
    Py_DECREF(mv);
    return nullptr;
  }
  if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(arr), mv) < 0) {  // steals mv
    Py_DECREF(arr);
    return nullptr;
  }
  return arr;
}

// pin_live(): the caller (holding the lock) is about to hand out a live
// view of the payload (read(safe=False)); a slotted stream then rewrites
// that slot in place from now on (Stream::pin_live_slot_locked).
PyObject* H_pin_live(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  if (!lock_held(h)) return nullptr;
  h->s->pin_live_slot_locked();
  Py_RETURN_NONE;
}

void H_releasebuffer(Handle* h, Py_buffer*) {
  h->exports -= 1;
  if (h->exports == 0 && h->closed) h->s->unmap();
}

// notify_fd() -> int: this handle's readiness descriptor (notify.h), made
// and armed on the first call; readable while a publication newer than
// last_read_count exists. Closed by close().
PyObject* H_notify_fd(Handle* h, PyObject*) {
  Guard g(h);
  if (!g.ok) return nullptr;
  if (h->notify == nullptr) {
    try {
      h->notify = torch_shmem::core::Notifier::attach(*h->s).release();
      h->notify->rearm(h->last_read_count);
    } catch (const Error& e) {
      delete h->notify;
      h->notify = nullptr;
      return raise_core_error(h, e);
    }
  }
  return PyLong_FromLong(h->notify->fd());
}

void H_dealloc(Handle* h) {
  // No call can be in flight (each holds a reference) and no export is
  // alive (each holds a reference): unmapping is safe.
  delete h->notify;
  h->notify = nullptr;
  delete h->s;
  h->s = nullptr;
  delete h->sim;
  h->sim = nullptr;
  Py_XDECREF(h->name);
  h->inflight.~atomic<int>();
  PyObject_Free(h);
}

PyMethodDef handle_methods[] = {
    {"write", (PyCFunction)(void (*)(void))H_write, METH_FASTCALL, nullptr},
    {"read", (PyCFunction)(void (*)(void))H_read, METH_FASTCALL, nullptr},
    {"read_after", (PyCFunction)(void (*)(void))H_read_after, METH_FASTCALL, nullptr},
    {"read_pub", (PyCFunction)(void (*)(void))H_read_pub, METH_FASTCALL, nullptr},
    {"read_after_pub", (PyCFunction)(void (*)(void))H_read_after_pub, METH_FASTCALL, nullptr},
    {"note_read", (PyCFunction)H_note_read, METH_NOARGS, nullptr},
    {"notify_fd", (PyCFunction)H_notify_fd, METH_NOARGS, nullptr},
    {"wait_for_count", (PyCFunction)(void (*)(void))H_wait_for_count, METH_FASTCALL, nullptr},
    {"clear", (PyCFunction)(void (*)(void))H_clear, METH_FASTCALL, nullptr},
    {"acquire", (PyCFunction)(void (*)(void))H_acquire, METH_FASTCALL, nullptr},
    {"release", (PyCFunction)H_release, METH_NOARGS, nullptr},
    {"held_depth", (PyCFunction)H_held_depth, METH_NOARGS, nullptr},
    {"begin_write", (PyCFunction)(void (*)(void))H_begin_write, METH_FASTCALL, nullptr},
    {"commit_write", (PyCFunction)(void (*)(void))H_commit_write, METH_FASTCALL, nullptr},
    {"abort_write", (PyCFunction)H_abort_write, METH_NOARGS, nullptr},
    {"close", (PyCFunction)(void (*)(void))H_close, METH_FASTCALL, nullptr},
    {"info", (PyCFunction)H_info, METH_NOARGS, nullptr},
    {"state", (PyCFunction)H_state, METH_NOARGS, nullptr},
    {"importers", (PyCFunction)H_importers, METH_NOARGS, nullptr},
    {"count", (PyCFunction)H_count, METH_NOARGS, nullptr},
    {"seq", (PyCFunction)H_seq, METH_NOARGS, nullptr},
    {"_wait_spin", (PyCFunction)H_wait_spin, METH_NOARGS, nullptr},
    {"read_stats", (PyCFunction)H_read_stats, METH_NOARGS, nullptr},
    {"live_array", (PyCFunction)H_live_array, METH_NOARGS, nullptr},
    {"pin_live", (PyCFunction)H_pin_live, METH_NOARGS, nullptr},
    {"note_count", (PyCFunction)H_note_count, METH_O, nullptr},
    {"sim_wait_count", (PyCFunction)(void (*)(void))H_sim_wait_count, METH_FASTCALL, nullptr},
    {"cursor_attach", (PyCFunction)(void (*)(void))H_cursor_attach, METH_FASTCALL, nullptr},
    {"cursor_advance", (PyCFunction)(void (*)(void))H_cursor_advance, METH_FASTCALL, nullptr},
    {"ring_read_at", (PyCFunction)(void (*)(void))H_ring_read_at, METH_FASTCALL, nullptr},
    {"cursor_detach", (PyCFunction)H_cursor_detach, METH_O, nullptr},
    {"cursor_consumed", (PyCFunction)H_cursor_consumed, METH_O, nullptr},
    {"read_next", (PyCFunction)(void (*)(void))H_read_next, METH_FASTCALL, nullptr},
    {"ring_info", (PyCFunction)H_ring_info, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef handle_getset[] = {
    {"closed", (getter)H_get_closed, nullptr, nullptr, nullptr},
    {"readonly", (getter)H_get_readonly, nullptr, nullptr, nullptr},
    {"name", (getter)H_get_name, nullptr, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyBufferProcs handle_buffer = {(getbufferproc)H_getbuffer, (releasebufferproc)H_releasebuffer};

PyMethodDef module_methods[] = {
    {"create", mod_create, METH_VARARGS, "create(name, dtype_code, shape, mode, flags)"},
    {"open", mod_open, METH_VARARGS, "open(name, readonly)"},
    {"unlink", mod_unlink, METH_O, "unlink(name) -> bool"},
    {"notifier", mod_notifier, METH_VARARGS,
     "notifier(name, instance_id) -> Notifier or None (a readiness descriptor for async waits)"},
    {"unlink_if", mod_unlink_if, METH_VARARGS,
     "unlink_if(name, instance_id) -> 'removed' | 'gone' | 'replaced'"},
    {"os_name", mod_os_name, METH_O, "os_name(name) -> str"},
    {"name_state", mod_name_state, METH_VARARGS,
     "name_state(name, instance_id) -> 'gone' | 'same' | 'other'"},
    {nullptr, nullptr, 0, nullptr}};

const char module_doc[] =
    "torch_shmem native core (NumPy path, no torch).\n\n"
    "Handle results with named fields (struct sequences: still tuples, so\n"
    "indexing and unpacking work):\n\n"
    "Handle.info() -> Info(dtype_code, shape, nbytes, flags, creator_pid,\n"
    "    instance_id, create_time, mode)\n"
    "Handle.state() -> State(seq, write_time_ns, frame_id, broken, unlinked,\n"
    "    owner_pid, owner_tid, waiters)\n"
    "Handle.read_stats() -> ReadStats(last_read_count, missed_writes,\n"
    "    total_missed_writes, last_count, last_write_time_ns, last_frame_id)\n\n"
    "DTYPES: {name: header dtype code}, the one dtype table (csrc/core/dtypes.h).";
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_core", module_doc, -1, module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__core(void) {
  import_array();
  HandleType.tp_name = "torch_shmem._core.Handle";
  HandleType.tp_basicsize = sizeof(Handle);
  HandleType.tp_flags = Py_TPFLAGS_DEFAULT;
  HandleType.tp_doc = "A mapping of one stream (internal; see torch_shmem.SharedMemory).";
  HandleType.tp_methods = handle_methods;
  HandleType.tp_getset = handle_getset;
  HandleType.tp_as_buffer = &handle_buffer;
  HandleType.tp_dealloc = (destructor)H_dealloc;
  if (PyType_Ready(&HandleType) < 0) return nullptr;
  NotifierType.tp_name = "torch_shmem._core.Notifier";
  NotifierType.tp_basicsize = sizeof(NotifierObject);
  NotifierType.tp_flags = Py_TPFLAGS_DEFAULT;
  NotifierType.tp_doc = "A readiness descriptor over a pinned stream header (internal).";
  NotifierType.tp_methods = notifier_methods;
  NotifierType.tp_dealloc = (destructor)N_dealloc;
  if (PyType_Ready(&NotifierType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  InconsistentStreamError = PyErr_NewExceptionWithDoc(
      "torch_shmem.InconsistentStreamError",
      "The stream holds an incomplete write (its writer died or aborted mid-write); "
      "the next completed write repairs it.",
      PyExc_RuntimeError, nullptr);
  if (InconsistentStreamError == nullptr) return nullptr;
  Py_INCREF(InconsistentStreamError);
  PyModule_AddObject(m, "InconsistentStreamError", InconsistentStreamError);
  StaleStreamError = PyErr_NewExceptionWithDoc(
      "torch_shmem.StaleStreamError",
      "The handle's stream was unlinked (and maybe re-created under its name). Raised by "
      "waits for a publication that can no longer come (StreamUnlinkedError, "
      "StreamReplacedError) and by unlink() of a handle whose name holds a newer generation.",
      PyExc_RuntimeError, nullptr);
  if (StaleStreamError == nullptr) return nullptr;
  StreamUnlinkedError = PyErr_NewExceptionWithDoc(
      "torch_shmem.StreamUnlinkedError",
      "A wait ended because its stream was unlinked and nothing holds the name now.",
      StaleStreamError, nullptr);
  if (StreamUnlinkedError == nullptr) return nullptr;
  StreamReplacedError = PyErr_NewExceptionWithDoc(
      "torch_shmem.StreamReplacedError",
      "The handle's stream was unlinked and its name now holds a new generation.",
      StaleStreamError, nullptr);
  if (StreamReplacedError == nullptr) return nullptr;
  for (auto [label, exc] : {std::pair<const char*, PyObject*>{"StaleStreamError", StaleStreamError},
                            {"StreamUnlinkedError", StreamUnlinkedError},
                            {"StreamReplacedError", StreamReplacedError}}) {
    Py_INCREF(exc);
    PyModule_AddObject(m, label, exc);
  }
  Py_INCREF(&HandleType);
  PyModule_AddObject(m, "Handle", reinterpret_cast<PyObject*>(&HandleType));
  for (auto [label, type, desc] :
       {std::tuple<const char*, PyTypeObject**, PyStructSequence_Desc*>{"Info", &InfoType,
                                                                        &info_desc},
        {"State", &StateType, &state_desc},
        {"ReadStats", &ReadStatsType, &read_stats_desc}}) {
    *type = PyStructSequence_NewType(desc);
    if (*type == nullptr) return nullptr;
    Py_INCREF(*type);
    if (PyModule_AddObject(m, label, reinterpret_cast<PyObject*>(*type)) != 0) return nullptr;
  }
  PyModule_AddIntConstant(m, "MAX_DIMS", torch_shmem::core::kMaxDims);
  PyModule_AddIntConstant(m, "MAX_NAME_BYTES", torch_shmem::core::kMaxNameBytes);
  PyModule_AddIntConstant(m, "FLAG_GPU", torch_shmem::core::kFlagGpu);
  PyModule_AddIntConstant(m, "FLAG_HOST_SLOTS", torch_shmem::core::kFlagHostSlots);
  PyModule_AddIntConstant(m, "MAX_SLOTS", torch_shmem::core::kMaxSlots);
  PyModule_AddIntConstant(m, "FLAG_RING", torch_shmem::core::kFlagRing);
  PyModule_AddIntConstant(m, "MAX_RING", torch_shmem::core::kMaxRingSlots);
  PyModule_AddIntConstant(m, "MAX_CURSORS", torch_shmem::core::kMaxCursors);
  PyModule_AddIntConstant(m, "MAX_CURSOR_NAME_BYTES", torch_shmem::core::kMaxCursorNameBytes);
  PyModule_AddIntConstant(m, "FLAG_CPU_MIRROR", torch_shmem::core::kFlagCpuMirror);
  PyModule_AddIntConstant(m, "FLAG_SIM_DEVICE", torch_shmem::core::kFlagSimDevice);
  PyModule_AddIntConstant(m, "FLAG_NOTIFY", torch_shmem::core::kFlagNotify);
  // DTYPES: {name: code} in code order, from the one dtype table
  // (csrc/core/dtypes.h); bfloat16 is listed although NumPy lacks it.
  PyObject* dtypes = PyDict_New();
  if (dtypes == nullptr) return nullptr;
#define TORCH_SHMEM_X(e, c, size, name, np, th)                    \
  {                                                                \
    PyObject* v = PyLong_FromLong(c);                              \
    if (v == nullptr || PyDict_SetItemString(dtypes, name, v) != 0) \
      return nullptr;                                              \
    Py_DECREF(v);                                                  \
  }
  TORCH_SHMEM_DTYPES(TORCH_SHMEM_X)
#undef TORCH_SHMEM_X
  if (PyModule_AddObject(m, "DTYPES", dtypes) != 0) return nullptr;
  return m;
}
