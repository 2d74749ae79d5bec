// The CUDA half: device memory for GPU streams (csrc/core/slots.h).
//
// One cudaMalloc allocation per stream holds the device counters and the
// payload slots; it is exported with cudaIpcGetMemHandle (the handle lives
// in the stream's CPU header) and mapped with cudaIpcOpenMemHandle at most
// once per process (legacy IPC forbids opening one's own handle, so the
// creating process serves its own pointer from the same cache).
//
// Writer operations run on the current torch CUDA stream of the stream's
// device and are ordered by it: gen odd -> copy -> gen even -> count (the
// counters stored by cuStreamWriteValue64, or a one-thread kernel where the
// driver lacks it); an event recorded after them is waited on before the
// host publication, so only the writer's own work is waited for, never the
// whole device. Readers copy on their current stream and read the slot's
// generation after the copy (same stream), then synchronize that stream;
// a current stream parked by wait_device on an unpublished count is waited
// out on the host first (see g_parks), never inside a CUDA synchronize.
//
// Only c10/cuda headers are used (the toolkit on the build machines has no
// cuBLAS headers, so ATen/cuda/CUDAContext.h is not available).
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // driver types and PFN_* only; libcuda is never linked

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <errno.h>
#include <unistd.h>

#include "../core/slots.h"
#include "../ops/gpu_backend.h"
#include "../ops/mirror_copy.h"

namespace torch_shmem {
namespace cuda {

namespace {

using core::Header;
using IID = std::array<uint8_t, 16>;

// On failure the runtime's last-error state is cleared before throwing:
// torch checks cudaGetLastError() after its own launches, and would report
// our error from an unrelated kernel later.
#define TSHM_CUDA_CHECK(call, what)                                                        \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) (void)cudaGetLastError();                                     \
    TORCH_CHECK(err_ == cudaSuccess, "torch_shmem: ", what, ": ", #call, " failed: ",       \
                cudaGetErrorString(err_));                                                 \
  } while (0)

__global__ void store_u64_kernel(unsigned long long* p, unsigned long long v) {
  // One thread; stream order makes the store visible to later work on the
  // writer's stream, the system fence to other streams and processes.
  *reinterpret_cast<volatile unsigned long long*>(p) = v;
  __threadfence_system();
}

// Fallback device-side wait where stream memory operations are unavailable:
// one thread polls the count (volatile, so every iteration reloads it);
// the stream's later work starts when the kernel ends.
__global__ void wait_geq_kernel(const unsigned long long* p, unsigned long long v) {
  const volatile unsigned long long* q = p;
  while (*q < v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(256);
#endif
  }
  __threadfence_system();
}

// Driver entry points fetched at run time (never linked, so the library
// loads on machines without a driver); nullptr if the driver lacks them.
template <typename Fn>
Fn driver_entry_point(const char* symbol) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &p, 11070, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    p = nullptr;
  }
  return reinterpret_cast<Fn>(p);
}

// TORCH_SHMEM_DEVICE_WAIT=poll: behave as on a driver without 64-bit
// stream memory operations (device waits by the polling kernel, counter
// stores by a one-thread kernel), so both paths can be tested on one
// machine. Read once per process.
bool memops_disabled_by_env() {
  static const bool off = [] {
    const char* v = std::getenv("TORCH_SHMEM_DEVICE_WAIT");
    return v != nullptr && std::string(v) == "poll";
  }();
  return off;
}

PFN_cuStreamWaitValue64_v11070 stream_wait_value64() {
  static const auto fn = memops_disabled_by_env()
                             ? nullptr
                             : driver_entry_point<PFN_cuStreamWaitValue64_v11070>("cuStreamWaitValue64");
  return fn;
}

PFN_cuStreamWriteValue64_v11070 stream_write_value64() {
  static const auto fn =
      memops_disabled_by_env()
          ? nullptr
          : driver_entry_point<PFN_cuStreamWriteValue64_v11070>("cuStreamWriteValue64");
  return fn;
}

// Set once a stream memory operation was refused (CUDA_ERROR_NOT_SUPPORTED
// or INVALID_VALUE: the device or driver lacks 64-bit stream memory
// operations); the kernels are used for the rest of the process.
std::atomic<bool> g_wait_memops_ok{true};
std::atomic<bool> g_write_memops_ok{true};

// Stream memory operations are driver calls: they need the device's context
// current on the calling thread. The runtime makes it current lazily, and a
// thread that has made no runtime call that needs it (a fresh thread whose
// device already matches, so CUDAGuard sets nothing) has none:
// CUDA_ERROR_INVALID_CONTEXT. cudaSetDevice makes the primary context
// current (CUDA >= 12), then the call is retried once.
template <typename Call>
CUresult with_current_context(int device, Call&& call) {
  CUresult r = call();
  if (r == CUDA_ERROR_INVALID_CONTEXT && cudaSetDevice(device) == cudaSuccess) r = call();
  (void)cudaGetLastError();
  return r;
}

// Counters reported by gpu_stats().
struct Stats {
  std::atomic<int64_t> wait_memops{0}, wait_kernels{0}, store_memops{0}, store_kernels{0},
      staged_uploads{0}, mirror_dma{0}, parked_reads{0}, deferred_releases{0};
};
Stats& g_stats = *new Stats();

// Device scope for destructors and deleters: plain runtime calls whose
// errors are ignored (c10's CUDAGuard throws on error, and a destructor may
// run while the runtime is being torn down at process exit).
class QuietDeviceScope {
 public:
  explicit QuietDeviceScope(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) (void)cudaSetDevice(device);
    (void)cudaGetLastError();
  }
  ~QuietDeviceScope() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
    (void)cudaGetLastError();
  }
  QuietDeviceScope(const QuietDeviceScope&) = delete;
  QuietDeviceScope& operator=(const QuietDeviceScope&) = delete;

 private:
  int prev_ = -1;
};

// The CPU-mirror copy: the copy engine (default; one DMA) or the Triton
// kernel through shmem::mirror_copy (TORCH_SHMEM_MIRROR=kernel; stores from
// the SMs straight into the page-locked pages). On an H200 the DMA was
// faster at every size measured (docs/benchmarks.md, "GPU"). Read when a
// stream is mapped. Pages that could not be page-locked always take the
// copy engine.
bool mirror_by_kernel_requested() {
  const char* v = std::getenv("TORCH_SHMEM_MIRROR");
  return v != nullptr && std::string(v) == "kernel";
}

// Host uploads from pageable memory: "direct" hands the pageable pointer to
// cudaMemcpyAsync (the driver stages it); "staged" copies it through two
// page-locked chunks of this process, the memcpy of one chunk overlapping
// the DMA of the other. TORCH_SHMEM_HOST_UPLOAD=direct|staged, read when a
// stream is mapped; sources that are already page-locked always go by DMA.
bool staged_uploads_requested() {
  const char* v = std::getenv("TORCH_SHMEM_HOST_UPLOAD");
  return v != nullptr && std::string(v) == "staged";
}
constexpr size_t kStageChunk = size_t(4) << 20;

bool is_page_locked(const void* p) {
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

IID iid_of(const Header* h) {
  IID id;
  std::memcpy(id.data(), h->instance_id, 16);
  return id;
}

// One mapping of one allocation in this process.
struct Mapping {
  void* base = nullptr;
  size_t bytes = 0;
  int device = -1;
  bool owned = false;  // allocated by this process (cudaFree) vs imported (close handle)
  // The stream's header page (importer table); nullptr where it could not
  // be mapped writable. An importer's entry is cleared after its unmap.
  std::unique_ptr<core::HeaderPin> pin;
  bool registered = false;
  std::string name;
  // A private non-blocking CUDA stream for reading the device count: it
  // never waits behind the callers' streams (which may be parked).
  std::mutex aux_mu;
  cudaStream_t aux = nullptr;

  uint64_t device_count() { return load_u64(0); }

  // A counter of the allocation's counter page, read or stored now through
  // a private non-blocking stream (never behind a caller's parked stream).
  uint64_t load_u64(uint64_t offset) {
    unsigned long long v = 0;
    aux_copy(&v, static_cast<uint8_t*>(base) + offset, cudaMemcpyDeviceToHost,
             "read a GPU stream's device counter");
    return v;
  }
  void store_u64_now(uint64_t offset, uint64_t value) {
    unsigned long long v = value;
    aux_copy(static_cast<uint8_t*>(base) + offset, &v, cudaMemcpyHostToDevice,
             "store a GPU stream's device counter");
  }
  void aux_copy(void* dst, const void* src, cudaMemcpyKind kind, const char* what) {
    std::lock_guard<std::mutex> g(aux_mu);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    if (aux == nullptr)
      TSHM_CUDA_CHECK(cudaStreamCreateWithFlags(&aux, cudaStreamNonBlocking),
                      "create a counter-access stream");
    TSHM_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(unsigned long long), kind, aux), what);
    TSHM_CUDA_CHECK(cudaStreamSynchronize(aux), what);
  }

  ~Mapping() {
    if (base != nullptr) {
      QuietDeviceScope scope(device);
      if (aux != nullptr) (void)cudaStreamDestroy(aux);
      if (owned)
        (void)cudaFree(base);
      else
        (void)cudaIpcCloseMemHandle(base);
      (void)cudaGetLastError();
    }
    if (registered) pin->remove_importer(static_cast<int32_t>(getpid()));
  }
};

// Never destroyed (see g_entries in csrc/ops/shmem_ops.cpp): the driver
// releases every allocation and mapping when the process exits.
std::mutex& g_mu = *new std::mutex();
// every live mapping
std::map<IID, std::weak_ptr<Mapping>>& g_cache = *new std::map<IID, std::weak_ptr<Mapping>>();
// the creator keeps its allocation until unlink
std::map<IID, std::shared_ptr<Mapping>>& g_owned = *new std::map<IID, std::shared_ptr<Mapping>>();
// unlinked by the creator, kept while another live process maps them
std::vector<std::shared_ptr<Mapping>>& g_pending = *new std::vector<std::shared_ptr<Mapping>>();

// Device waits queued by this process (wait_device), per CUDA stream: the
// stream runs nothing queued after them until that allocation's device
// count reaches n. Entries are dropped once it has (checked lazily).
// A host-synchronous operation queued behind an unresolved park would
// block until then: reads wait for the publication on the host first
// (SlotMemory::unresolved_park); publishes on a parked stream are refused.
struct Park {
  std::weak_ptr<Mapping> map;
  uint64_t n;
};
std::mutex& g_parks_mu = *new std::mutex();
std::map<cudaStream_t, std::vector<Park>>& g_parks = *new std::map<cudaStream_t, std::vector<Park>>();

// The unresolved parks of CUDA stream st (resolved and stale entries are
// dropped). Reads the device counts on private streams.
std::vector<std::pair<std::shared_ptr<Mapping>, uint64_t>> unresolved_parks(cudaStream_t st) {
  std::vector<std::pair<std::shared_ptr<Mapping>, uint64_t>> out;
  std::lock_guard<std::mutex> g(g_parks_mu);
  auto it = g_parks.find(st);
  if (it == g_parks.end()) return out;
  auto& v = it->second;
  for (auto p = v.begin(); p != v.end();) {
    auto m = p->map.lock();
    if (m == nullptr || m->device_count() >= p->n) {
      p = v.erase(p);
    } else {
      out.emplace_back(std::move(m), p->n);
      ++p;
    }
  }
  if (v.empty()) g_parks.erase(it);
  return out;
}

// Views (live_view/slot_view) whose last reference went while kernels that
// read them may still be queued: each keeps its mapping until its event,
// recorded on the device's current stream at deletion, has completed.
std::mutex& g_deferred_mu = *new std::mutex();
std::vector<std::pair<cudaEvent_t, std::shared_ptr<core::SlotMemory>>>& g_deferred =
    *new std::vector<std::pair<cudaEvent_t, std::shared_ptr<core::SlotMemory>>>();

void sweep_deferred() noexcept {
  std::vector<std::shared_ptr<core::SlotMemory>> drop;
  {
    std::lock_guard<std::mutex> g(g_deferred_mu);
    for (auto it = g_deferred.begin(); it != g_deferred.end();) {
      cudaError_t q = cudaEventQuery(it->first);
      if (q == cudaErrorNotReady) {
        ++it;
        continue;
      }
      (void)cudaEventDestroy(it->first);
      drop.push_back(std::move(it->second));
      it = g_deferred.erase(it);
    }
    (void)cudaGetLastError();
  }
  // `drop` releases the mappings here, outside the lock.
}

// Drops the pending allocations no live importer maps any more (freed once
// no handle of this process uses them). Called on every create, attach and
// unlink of a GPU stream in this process.
void sweep_pending() {
  std::vector<std::shared_ptr<Mapping>> drop;
  {
    std::lock_guard<std::mutex> g(g_mu);
    for (auto it = g_pending.begin(); it != g_pending.end();) {
      if ((*it)->pin == nullptr || (*it)->pin->live_importers() == 0) {
        drop.push_back(std::move(*it));
        it = g_pending.erase(it);
      } else {
        ++it;
      }
    }
  }
  // `drop` frees here, outside the lock.
}

// Loads this library's kernels on `device` now, once per device and process.
// Under lazy module loading (CUDA_MODULE_LOADING=LAZY, the default) a
// kernel's first launch loads its module, which can wait for work already
// queued on the device; if that work is a consumer parked by wait_device on
// the count this very launch (the store kernel) would publish, the process
// deadlocks. Resolving the functions when a stream is mapped avoids that.
void load_kernels(int device) {
  static std::mutex mu;
  static std::vector<bool> done;
  std::lock_guard<std::mutex> g(mu);
  if (device < 0) return;
  if (done.size() <= static_cast<size_t>(device)) done.resize(device + 1, false);
  if (done[device]) return;
  cudaFuncAttributes a;
  TSHM_CUDA_CHECK(cudaFuncGetAttributes(&a, store_u64_kernel), "load the counter store kernel");
  TSHM_CUDA_CHECK(cudaFuncGetAttributes(&a, wait_geq_kernel), "load the device wait kernel");
  done[device] = true;
}

class CudaSlotMemory : public core::SlotMemory {
 public:
  CudaSlotMemory(std::shared_ptr<Mapping> map, const Header* h)
      : map_(std::move(map)),
        stride_(h->slot_stride),
        nbytes_(h->payload_bytes),
        staged_(staged_uploads_requested()),
        mirror_by_kernel_(mirror_by_kernel_requested()) {
    c10::cuda::CUDAGuard guard(device());
    TSHM_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "event");
    load_kernels(map_->device);
  }
  ~CudaSlotMemory() override {
    QuietDeviceScope scope(map_->device);
    (void)cudaEventDestroy(done_);
    for (int i = 0; i < 2; ++i) {
      if (stage_done_[i] != nullptr) (void)cudaEventDestroy(stage_done_[i]);
      if (stage_[i] != nullptr) (void)cudaFreeHost(stage_[i]);
    }
    (void)cudaGetLastError();
  }

  void store_gen(uint32_t slot, uint64_t gen) override {
    if (gen & 1) refuse_self_deadlock((gen + 1) / 2);
    store_u64(core::gen_offset(slot), gen);
  }

  void copy_in(uint32_t slot, const void* src, bool src_on_device) override {
    c10::cuda::CUDAGuard guard(device());
    if (!src_on_device && staged_ && nbytes_ > kStageChunk && !is_page_locked(src)) {
      staged_upload(slot_ptr(slot), static_cast<const uint8_t*>(src));
      g_stats.staged_uploads.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    TSHM_CUDA_CHECK(cudaMemcpyAsync(slot_ptr(slot), src, nbytes_,
                                    src_on_device ? cudaMemcpyDeviceToDevice
                                                  : cudaMemcpyHostToDevice,
                                    stream()),
                    "copy into a GPU stream slot");
  }

  void store_count(uint64_t count) override { store_u64(0, count); }

  void finish_writer() override {
    c10::cuda::CUDAGuard guard(device());
    TSHM_CUDA_CHECK(cudaEventRecord(done_, stream()), "record the write event");
    TSHM_CUDA_CHECK(cudaEventSynchronize(done_), "wait for the write");
  }

  uint64_t copy_out_then_gen(uint32_t slot, void* dst, bool dst_on_device) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    TSHM_CUDA_CHECK(cudaMemcpyAsync(dst, slot_ptr(slot), nbytes_,
                                    dst_on_device ? cudaMemcpyDeviceToDevice
                                                  : cudaMemcpyDeviceToHost,
                                    st),
                    "copy out of a GPU stream slot");
    unsigned long long gen = 0;
    TSHM_CUDA_CHECK(cudaMemcpyAsync(&gen, static_cast<uint8_t*>(map_->base) + core::gen_offset(slot),
                                    sizeof(gen), cudaMemcpyDeviceToHost, st),
                    "read the slot generation");
    TSHM_CUDA_CHECK(cudaStreamSynchronize(st), "wait for the read");
    return gen;
  }

  // Into the CPU payload, page-locked by the writer's handle (Entry::host_pin):
  // the Triton kernel (through the dispatcher) or one DMA; pageable pages
  // (registration failed) go through the driver's copy.
  void mirror_out(uint32_t slot, void* host_dst) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    const bool by_kernel = mirror_by_kernel_ && is_page_locked(host_dst) &&
                           ops::mirror_copy_via_op(slot_ptr(slot), host_dst, nbytes_, map_->device);
    if (!by_kernel) {
      TSHM_CUDA_CHECK(cudaMemcpyAsync(host_dst, slot_ptr(slot), nbytes_, cudaMemcpyDeviceToHost, st),
                      "copy a GPU stream slot into its CPU mirror");
      g_stats.mirror_dma.fetch_add(1, std::memory_order_relaxed);
    }
    TSHM_CUDA_CHECK(cudaStreamSynchronize(st), "wait for the CPU mirror copy");
  }

  void* slot_ptr(uint32_t slot) override {
    return static_cast<uint8_t*>(map_->base) + core::kDeviceCountersBytes + stride_ * slot;
  }

  // The consumer's current CUDA stream waits for count >= n on the device;
  // the host returns at once. Without 64-bit stream memory operations
  // (refused by the driver, or TORCH_SHMEM_DEVICE_WAIT=poll) the polling
  // kernel waits instead, for the rest of the process (logged once). The
  // park is recorded only once it is queued.
  bool queue_wait_count(uint64_t n, double /*host_timeout*/) override {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    queue_wait_geq(0, n);  // the count, offset 0
    std::lock_guard<std::mutex> g(g_parks_mu);
    g_parks[st].push_back(Park{map_, n});
    return true;
  }

  uint64_t load_device_count() override { return map_->device_count(); }

  // ---- GPU rings (ring.h): per-cursor device counters -----------------
  void copy_out_then_store_cursor(uint32_t slot, void* dst, bool dst_on_device, uint32_t index,
                                  uint64_t c) override {
    c10::cuda::CUDAGuard guard(device());
    if (dst != nullptr)
      TSHM_CUDA_CHECK(cudaMemcpyAsync(dst, slot_ptr(slot), nbytes_,
                                      dst_on_device ? cudaMemcpyDeviceToDevice
                                                    : cudaMemcpyDeviceToHost,
                                      stream()),
                      "copy out of a GPU ring slot");
    store_u64(core::cursor_counter_offset(index), c);  // after the copy, in stream order
  }
  bool queue_wait_cursor(uint32_t index, uint64_t n) override {
    c10::cuda::CUDAGuard guard(device());
    queue_wait_geq(core::cursor_counter_offset(index), n);
    return true;
  }
  uint64_t load_cursor(uint32_t index) override {
    return map_->load_u64(core::cursor_counter_offset(index));
  }
  void force_cursor(uint32_t index, uint64_t v) override {
    map_->store_u64_now(core::cursor_counter_offset(index), v);
  }
  // The writer's queue waits on readers' counters: poll its event, calling
  // every_slice (release of dead readers) about every 100 ms.
  void finish_writer_while(const std::function<void()>& every_slice) override {
    c10::cuda::CUDAGuard guard(device());
    TSHM_CUDA_CHECK(cudaEventRecord(done_, stream()), "record the write event");
    auto next = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
    for (;;) {
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) TSHM_CUDA_CHECK(q, "wait for the GPU ring's readers");
      (void)cudaGetLastError();  // clear the not-ready status
      if (std::chrono::steady_clock::now() >= next) {
        every_slice();
        next = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

 private:
  // Work queued on the current CUDA stream after this waits until the u64 at
  // `offset` of the counter page is >= n. Without 64-bit stream memory
  // operations (refused by the driver, or TORCH_SHMEM_DEVICE_WAIT=poll) the
  // polling kernel waits instead, for the rest of the process (logged once).
  void queue_wait_geq(uint64_t offset, uint64_t n) {
    cudaStream_t st = stream();
    auto* count =
        reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(map_->base) + offset);
    bool queued = false;
    if (auto fn = stream_wait_value64(); fn != nullptr && g_wait_memops_ok.load()) {
      CUresult r = with_current_context(map_->device, [&] {
        return fn(reinterpret_cast<CUstream>(st), reinterpret_cast<CUdeviceptr>(count),
                  static_cast<cuuint64_t>(n), CU_STREAM_WAIT_VALUE_GEQ);
      });
      if (r == CUDA_SUCCESS) {
        queued = true;
        g_stats.wait_memops.fetch_add(1, std::memory_order_relaxed);
      } else {
        memop_refused(r, "cuStreamWaitValue64", "device waits use a one-thread polling kernel",
                      g_wait_memops_ok);
      }
    }
    if (!queued) {
      wait_geq_kernel<<<1, 1, 0, st>>>(count, static_cast<unsigned long long>(n));
      TSHM_CUDA_CHECK(cudaGetLastError(), "queue a device-side wait");
      g_stats.wait_kernels.fetch_add(1, std::memory_order_relaxed);
    }
  }

 public:
  // See SlotMemory::unresolved_park: the current CUDA stream's parks.
  uint64_t unresolved_park() override {
    uint64_t same = 0;
    for (auto& [m, n] : unresolved_parks(stream())) {
      TORCH_CHECK(m == map_, "torch_shmem: GPU stream '", map_->name,
                  "': the current CUDA stream was told to wait (wait_device) for count ", n,
                  " of GPU stream '", m->name,
                  "', which is not published yet, so a read queued on it would block until "
                  "then; read from another CUDA stream");
      same = std::max(same, n);
    }
    if (same != 0) g_stats.parked_reads.fetch_add(1, std::memory_order_relaxed);
    return same;
  }

 private:
  // A stream memory operation returned r != CUDA_SUCCESS: an error unless
  // the driver or device lacks 64-bit stream memory operations
  // (NOT_SUPPORTED, INVALID_VALUE); then `ok` is cleared, so the kernel
  // fallback serves the rest of the process, with one warning per function.
  void memop_refused(CUresult r, const char* fn, const char* fallback, std::atomic<bool>& ok) {
    TORCH_CHECK(r == CUDA_ERROR_NOT_SUPPORTED || r == CUDA_ERROR_INVALID_VALUE,
                "torch_shmem: GPU stream '", map_->name, "': ", fn, " failed (CUresult ", int(r), ")");
    if (ok.exchange(false))
      TORCH_WARN("torch_shmem: the driver refused ", fn, " (CUresult ", int(r), "); ", fallback,
                 " from now on");
  }

  c10::DeviceIndex device() const { return static_cast<c10::DeviceIndex>(map_->device); }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(device()).stream(); }
  // Counter stores on the writer's stream: cuStreamWriteValue64 (its
  // default flags fence the stream's earlier writes before the store, like
  // __threadfence_system), else a one-thread kernel.
  void store_u64(uint64_t offset, uint64_t v) {
    c10::cuda::CUDAGuard guard(device());
    cudaStream_t st = stream();
    auto* p = reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(map_->base) + offset);
    if (auto fn = stream_write_value64(); fn != nullptr && g_write_memops_ok.load()) {
      CUresult r = with_current_context(map_->device, [&] {
        return fn(reinterpret_cast<CUstream>(st), reinterpret_cast<CUdeviceptr>(p),
                  static_cast<cuuint64_t>(v), CU_STREAM_WRITE_VALUE_DEFAULT);
      });
      if (r == CUDA_SUCCESS) {
        g_stats.store_memops.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      memop_refused(r, "cuStreamWriteValue64", "device counters are stored by a one-thread kernel",
                    g_write_memops_ok);
    }
    store_u64_kernel<<<1, 1, 0, st>>>(p, static_cast<unsigned long long>(v));
    TSHM_CUDA_CHECK(cudaGetLastError(), "store a device counter");
    g_stats.store_kernels.fetch_add(1, std::memory_order_relaxed);
  }

  // The writer's first queued operation for publication c: refuse (before
  // anything is queued) when this CUDA stream is parked on a count that
  // only this publication (or a later one) of this stream reaches, or on
  // another GPU stream's unpublished count: the write, and the wait for it
  // that the host makes holding this stream's lock, would queue behind it.
  void refuse_self_deadlock(uint64_t c) {
    for (auto& [m, n] : unresolved_parks(stream())) {
      TORCH_CHECK(m != map_ || n < c, "torch_shmem: cannot publish count ", c, " of GPU stream '",
                  map_->name, "' on this CUDA stream: it was told to wait (wait_device) for count ",
                  n, " of the same GPU stream, so the write would queue behind its own wait and "
                  "never run; publish from another CUDA stream");
      TORCH_CHECK(m == map_, "torch_shmem: cannot publish to GPU stream '", map_->name,
                  "' on this CUDA stream: it was told to wait (wait_device) for count ", n,
                  " of GPU stream '", m->name, "', which is not published yet, and the write "
                  "would wait behind it holding this stream's lock; publish from another CUDA "
                  "stream");
    }
  }

  // Pageable source -> slot through two page-locked chunks: chunk i is
  // copied into stage_[i % 2] once the DMA that last read that buffer is
  // done (its event), then queued for DMA on the writer's stream; the host
  // memcpy of one chunk overlaps the DMA of the previous one.
  void staged_upload(void* dst, const uint8_t* src) {
    cudaStream_t st = stream();
    for (int i = 0; i < 2; ++i) {
      if (stage_[i] == nullptr) {
        TSHM_CUDA_CHECK(cudaHostAlloc(&stage_[i], kStageChunk, cudaHostAllocPortable),
                        "allocate an upload staging buffer");
        TSHM_CUDA_CHECK(cudaEventCreateWithFlags(&stage_done_[i], cudaEventDisableTiming),
                        "event");
      }
    }
    uint64_t off = 0;
    for (int i = 0; off < nbytes_; ++i, off += kStageChunk) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kStageChunk, nbytes_ - off));
      const int b = i & 1;
      // (at once for the first two chunks: the last write ended with its
      // queue complete, and an event never recorded counts as complete)
      TSHM_CUDA_CHECK(cudaEventSynchronize(stage_done_[b]), "wait for a staging buffer");
      std::memcpy(stage_[b], src + off, n);
      TSHM_CUDA_CHECK(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + off, stage_[b], n,
                                      cudaMemcpyHostToDevice, st),
                      "upload into a GPU stream slot");
      TSHM_CUDA_CHECK(cudaEventRecord(stage_done_[b], st), "record a staging event");
    }
  }

  std::shared_ptr<Mapping> map_;
  uint64_t stride_;
  uint64_t nbytes_;
  bool staged_;
  bool mirror_by_kernel_;
  cudaEvent_t done_ = nullptr;
  void* stage_[2] = {nullptr, nullptr};
  cudaEvent_t stage_done_[2] = {nullptr, nullptr};
};

// The ordinal of the visible device with this uuid, or -1. The uuids are
// read once per process (device properties are slow to query).
int device_by_uuid(const uint8_t uuid[16]) {
  static std::mutex mu;
  static std::vector<std::array<uint8_t, 16>>* uuids = nullptr;
  std::lock_guard<std::mutex> g(mu);
  if (uuids == nullptr) {
    auto found = std::make_unique<std::vector<std::array<uint8_t, 16>>>();
    int n = 0;
    TSHM_CUDA_CHECK(cudaGetDeviceCount(&n), "count devices");
    for (int i = 0; i < n; ++i) {
      cudaDeviceProp prop;
      TSHM_CUDA_CHECK(cudaGetDeviceProperties(&prop, i), "device properties");
      std::array<uint8_t, 16> u;
      std::memcpy(u.data(), prop.uuid.bytes, 16);
      found->push_back(u);
    }
    uuids = found.release();  // never freed: read by every later attach
  }
  for (size_t i = 0; i < uuids->size(); ++i)
    if (std::memcmp((*uuids)[i].data(), uuid, 16) == 0) return static_cast<int>(i);
  return -1;
}

const char* memop_path(std::atomic<int64_t>& memops, std::atomic<int64_t>& kernels) {
  if (memops.load() > 0 && kernels.load() > 0) return "memop+kernel";
  if (memops.load() > 0) return "memop";
  if (kernels.load() > 0) return "kernel";
  return "unused";
}

class CudaBackend : public ops::GpuBackend {
 public:
  std::shared_ptr<core::SlotMemory> create(Header* h, int device) override {
    sweep_pending();
    sweep_deferred();
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    auto map = std::make_shared<Mapping>();
    map->device = device;
    map->bytes = h->device_bytes;
    map->owned = true;
    map->name.assign(h->name, h->name_len);
    map->pin = core::HeaderPin::open(std::string(h->name, h->name_len), h->instance_id);
    TSHM_CUDA_CHECK(cudaMalloc(&map->base, map->bytes), "allocate a GPU stream");
    // Zeroed on a private non-blocking stream and waited for alone: neither
    // the legacy default stream (which would wait for every blocking stream)
    // nor the caller's current stream (which may be parked in wait_device).
    {
      cudaStream_t zs = nullptr;
      TSHM_CUDA_CHECK(cudaStreamCreateWithFlags(&zs, cudaStreamNonBlocking), "zero a GPU stream");
      cudaError_t e1 = cudaMemsetAsync(map->base, 0, map->bytes, zs);
      cudaError_t e2 = e1 == cudaSuccess ? cudaStreamSynchronize(zs) : e1;
      (void)cudaStreamDestroy(zs);
      TSHM_CUDA_CHECK(e2, "zero a GPU stream");
    }
    cudaIpcMemHandle_t handle;
    TSHM_CUDA_CHECK(cudaIpcGetMemHandle(&handle, map->base), "export a GPU stream");
    static_assert(sizeof(handle) <= sizeof(h->ipc_handle), "IPC handle does not fit");
    std::memcpy(h->ipc_handle, &handle, sizeof(handle));
    cudaDeviceProp prop;
    TSHM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "device properties");
    std::memcpy(h->device_uuid, prop.uuid.bytes, 16);
    h->device_index = static_cast<uint32_t>(device);
    {
      std::lock_guard<std::mutex> g(g_mu);
      g_cache[iid_of(h)] = map;
      g_owned[iid_of(h)] = map;
    }
    return std::make_shared<CudaSlotMemory>(map, h);
  }

  std::shared_ptr<core::SlotMemory> attach(const Header* h, int device, int* device_out) override {
    int found = device_by_uuid(h->device_uuid);
    TORCH_CHECK(found >= 0, "torch_shmem: GPU stream '", std::string(h->name, h->name_len),
                "' lives on a device this process cannot see (check CUDA_VISIBLE_DEVICES)");
    TORCH_CHECK(device < 0 || device == found, "torch_shmem: GPU stream '",
                std::string(h->name, h->name_len), "' lives on cuda:", found,
                " in this process, not cuda:", device);
    *device_out = found;
    sweep_pending();
    sweep_deferred();
    const IID id = iid_of(h);
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_cache.find(id);
    std::shared_ptr<Mapping> map = it == g_cache.end() ? nullptr : it->second.lock();
    if (map == nullptr) {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(found));
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, h->ipc_handle, sizeof(handle));
      map = std::make_shared<Mapping>();
      map->device = found;
      map->bytes = h->device_bytes;
      map->name.assign(h->name, h->name_len);
      // Registered before mapping, so the creator cannot free the memory
      // between our open and our entry; then the unlinked flag is checked,
      // so an entry made after the creator's last look backs out (the
      // creator unlinks first, then counts importers).
      const std::string name(h->name, h->name_len);
      int why = 0;
      map->pin = core::HeaderPin::open(name, h->instance_id, &why);
      TORCH_CHECK(map->pin != nullptr || why == EACCES || why == EPERM,
                  "torch_shmem: GPU stream '", name,
                  "' was unlinked; its device memory is being released");
      if (map->pin != nullptr) {
        TORCH_CHECK(map->pin->add_importer(static_cast<int32_t>(getpid())),
                    "torch_shmem: GPU stream '", name, "' is already mapped by ",
                    core::kMaxImporters, " other processes (the limit)");
        map->registered = true;
        TORCH_CHECK(!map->pin->unlinked(), "torch_shmem: GPU stream '", name,
                    "' was unlinked; its device memory is being released");
      }
      cudaError_t err = cudaIpcOpenMemHandle(&map->base, handle, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();  // not torch's error to find later
        map->base = nullptr;
        TORCH_CHECK(false, "torch_shmem: cannot map GPU stream '",
                    std::string(h->name, h->name_len), "' (",
                    cudaGetErrorString(err),
                    "); its creating process may have exited, which frees the device memory");
      }
      g_cache[id] = map;
    }
    return std::make_shared<CudaSlotMemory>(map, h);
  }

  void forget(const uint8_t instance_id[16]) override {
    IID id;
    std::memcpy(id.data(), instance_id, 16);
    {
      std::lock_guard<std::mutex> g(g_mu);
      auto it = g_owned.find(id);
      if (it != g_owned.end()) {
        g_pending.push_back(std::move(it->second));
        g_owned.erase(it);
      }
    }
    // Freed now if no other live process maps it and no handle of this
    // process uses it; else later (a sweep, or the last handle's close).
    sweep_deferred();
    sweep_pending();
  }

  std::shared_ptr<void> pin_host(void* p, uint64_t bytes, int device) override {
    if (p == nullptr || bytes == 0) return nullptr;
    // In the stream's device's context (not whichever device is current);
    // portable: usable from every device's context; mapped: the mirror
    // kernel stores into the pages through their device address.
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    if (cudaHostRegister(p, static_cast<size_t>(bytes),
                         cudaHostRegisterPortable | cudaHostRegisterMapped) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    return std::shared_ptr<void>(p, [device](void* q) {
      QuietDeviceScope scope(device);
      (void)cudaHostUnregister(q);
      (void)cudaGetLastError();
    });
  }

  void release_after_queued_work(std::shared_ptr<core::SlotMemory> keep, int device) noexcept override {
    try {
      sweep_deferred();
      QuietDeviceScope scope(device);
      cudaEvent_t ev = nullptr;
      if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess) {
        (void)cudaGetLastError();
        return;  // `keep` goes now (the runtime is unusable, e.g. at exit)
      }
      cudaStream_t st = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
      if (cudaEventRecord(ev, st) != cudaSuccess) {
        (void)cudaGetLastError();
        (void)cudaEventDestroy(ev);
        return;
      }
      g_stats.deferred_releases.fetch_add(1, std::memory_order_relaxed);
      std::lock_guard<std::mutex> g(g_deferred_mu);
      g_deferred.emplace_back(ev, std::move(keep));
    } catch (...) {
      // never from a deleter
    }
  }

  std::vector<std::pair<std::string, std::string>> stats() override {
    Stats& st = g_stats;
    auto n = [](const std::atomic<int64_t>& a) { return std::to_string(a.load()); };
    return {
        {"device_wait_path", memop_path(st.wait_memops, st.wait_kernels)},
        {"counter_store_path", memop_path(st.store_memops, st.store_kernels)},
        {"device_wait_memops", n(st.wait_memops)},
        {"device_wait_kernels", n(st.wait_kernels)},
        {"counter_store_memops", n(st.store_memops)},
        {"counter_store_kernels", n(st.store_kernels)},
        {"memops_disabled_by_env", memops_disabled_by_env() ? "1" : "0"},
        {"staged_uploads", n(st.staged_uploads)},
        {"mirror_dma_copies", n(st.mirror_dma)},
        {"parked_reads_waited", n(st.parked_reads)},
        {"deferred_view_releases", n(st.deferred_releases)},
    };
  }
};

CudaBackend g_backend;

struct Register {
  Register() { ops::set_gpu_backend(&g_backend); }
} g_register;

}  // namespace
}  // namespace cuda
}  // namespace torch_shmem
