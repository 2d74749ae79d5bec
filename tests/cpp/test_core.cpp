// Sanitizer driver for the C++ core (csrc/core), built and run by
// tests/test_reliability_sanitizers.py with -fsanitize=address,undefined:
//
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all
//       -Icsrc tests/cpp/test_core.cpp csrc/core/*.cpp
//       -lpthread -o test_core && ./test_core [iterations] [seed]
//
// It exercises what the Python suite cannot see from above: every header
// byte randomized (with and without a fixed-up checksum) before open, the
// validated handle then driven through every core operation, crafted
// headers, writers and readers in threads, a writer SIGKILLed mid-write, and
// the slot protocol. Any out-of-bounds access, use after free or undefined
// behaviour aborts with the sanitizer's report; a failed CHECK exits 1.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/notify.h"
#include "core/session.h"
#include "core/slots.h"
#include "core/stream.h"

using namespace torch_shmem::core;

namespace {

int g_checks = 0;

#define CHECK(cond)                                                        \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "CHECK failed at line %d: %s\n", __LINE__, #cond); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

std::string g_prefix;

std::string stream_name(const char* tag) { return g_prefix + tag; }

std::string path_of(const std::string& name) { return "/dev/shm/torch_shmem." + name; }

CreateOptions geometry_u64(int64_t n) {
  CreateOptions g;
  g.dtype_code = kUInt64;
  g.ndim = 1;
  g.shape[0] = n;
  return g;
}

constexpr uint64_t C = 0x9E3779B97F4A7C15ULL;

void make_frame(uint64_t k, std::vector<uint64_t>* f) {
  for (size_t i = 0; i < f->size(); ++i) (*f)[i] = k ^ (i * C);
}

bool frame_ok(const std::vector<uint64_t>& f) {
  uint64_t k = f[0];
  for (size_t i = 1; i < f.size(); ++i)
    if (f[i] != (k ^ (i * C))) return false;
  return true;
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::vector<unsigned char> out;
  int fd = ::open(path.c_str(), O_RDONLY);
  CHECK(fd >= 0);
  struct stat st;
  CHECK(fstat(fd, &st) == 0);
  out.resize(st.st_size);
  CHECK(pread(fd, out.data(), out.size(), 0) == static_cast<ssize_t>(out.size()));
  ::close(fd);
  return out;
}

void write_file(const std::string& path, const std::vector<unsigned char>& data) {
  int fd = ::open(path.c_str(), O_RDWR);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, data.size()) == 0);
  CHECK(pwrite(fd, data.data(), data.size(), 0) == static_cast<ssize_t>(data.size()));
  ::close(fd);
}

void fix_checksum(std::vector<unsigned char>* bytes) {
  if (bytes->size() < kHeaderBytes) return;
  uint64_t c = geometry_checksum(reinterpret_cast<const Header*>(bytes->data()));
  std::memcpy(bytes->data() + offsetof(Header, geometry_checksum), &c, 8);
}

// Everything a client can do with a handle, with short timeouts; core
// errors are expected outcomes, memory errors are what we look for.
void drive(Stream* s) {
  std::vector<unsigned char> buf(s->payload_bytes() + 64);
  Snapshot snap;
  auto attempt = [&](auto&& f) {
    try {
      f();
    } catch (const Error&) {
    }
  };
  attempt([&] { s->read_fast(buf.data(), &snap); });
  attempt([&] { s->wait_slice(s->count(), 0, 0.001); });
  attempt([&] {
    if (s->lock_for(0.01)) {
      attempt([&] { s->read_locked(buf.data()); });
      attempt([&] { s->write_locked(buf.data(), true, 7); });
      attempt([&] { s->clear_locked(); });
      attempt([&] {
        s->begin_write_locked();
        s->abort_write_locked();
      });
      attempt([&] { s->read_locked(buf.data()); });
      s->unlock();
    }
  });
  attempt([&] { s->read_fast(buf.data(), &snap); });
  s->wake_all();
}

// ---- tests -----------------------------------------------------------------

void test_basics() {
  const std::string name = stream_name("basic");
  Stream::unlink_name(name);
  std::unique_ptr<Stream> w(Stream::create(name, geometry_u64(1000)));
  std::unique_ptr<Stream> r(Stream::open(name, true));
  CHECK(r->payload_bytes() == 8000 && r->geometry()->ndim == 1);
  std::vector<uint64_t> f(1000), got(1000);
  for (uint64_t k = 1; k <= 50; ++k) {
    make_frame(k, &f);
    CHECK(w->lock_for(1));
    CHECK(w->lock_for(1) && w->held_depth() == 2);  // re-entrant
    w->unlock();
    CHECK(w->write_locked(f.data(), true, k) == k);
    w->unlock();
    Snapshot snap;
    CHECK(r->read_fast(got.data(), &snap));
    CHECK(frame_ok(got) && got[0] == k && snap.count == k && snap.frame_id == k);
    CHECK(r->wait_slice(k - 1, 0, 0.01));
    CHECK(!r->wait_slice(k, 0, 0.001));
  }
  CHECK(w->lock_for(1));
  w->begin_write_locked();
  w->abort_write_locked();
  w->unlock();
  bool threw = false;
  try {
    Snapshot snap;
    r->read_fast(got.data(), &snap);
  } catch (const Error& e) {
    threw = e.kind() == ErrorKind::kInconsistent;
  }
  CHECK(threw);
  CHECK(w->lock_for(1));
  CHECK(w->clear_locked() == 51);  // repairs
  w->unlock();
  Snapshot snap;
  CHECK(r->read_fast(got.data(), &snap) && got[0] == 0 && snap.count == 51);
  CHECK(Stream::unlink_name(name));
  CHECK(!Stream::unlink_name(name));
}

// A reader parked in wait_slice (with `gone`) is woken by unlink_name and
// reports the stream gone; a publication newer than `after` still wins; the
// name then reads as gone, and as another generation once re-created.
// Session: a lock held by another thread times out at the deadline (the
// hook runs between slices) or ends when the hook says so; a wait times
// out, ends on a publication, and reports an unlinked generation; read()
// releases the lock it took.
void test_session() {
  const std::string name = stream_name("session");
  Stream::unlink_name(name);
  std::unique_ptr<Stream> w(Stream::create(name, geometry_u64(4)));
  std::unique_ptr<Stream> r(Stream::open(name, true));
  const Session sw(*w, nullptr), sr(*r, nullptr);
  std::atomic<int> stage{0};
  std::thread holder([&] {
    CHECK(w->lock_for(1));
    stage = 1;
    while (stage.load() != 2) std::this_thread::yield();
    w->unlock();
  });
  while (stage.load() != 1) std::this_thread::yield();
  int calls = 0;
  auto go_on = [&] { ++calls; return true; };
  bool timed_out = false;
  try {
    sr.lock_until(Deadline::after(0.12), go_on);
  } catch (const Error& e) {
    timed_out = e.kind() == ErrorKind::kTimeout &&
                std::string(e.what()).find("write lock") != std::string::npos;
  }
  CHECK(timed_out && calls >= 2);  // one call per slice of at most kLockSlice
  auto stop = [] { return false; };
  const double t0 = now_monotonic();
  CHECK(sr.lock_until(Deadline::after(-1), stop) == Blocked::kInterrupted);
  CHECK(now_monotonic() - t0 < 1.0);
  stage = 2;
  holder.join();

  timed_out = false;
  try {
    sr.wait_until(r->count(), Deadline::after(0.05), go_on);
  } catch (const Error& e) {
    timed_out = e.kind() == ErrorKind::kTimeout;
  }
  CHECK(timed_out);
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(w->lock_for(1));
    torch_shmem::core::LockGuard held(*w);
    std::vector<uint64_t> f(4, 3);
    CHECK(sw.write_locked(f.data(), false, true, 9) == 1);
  });
  CHECK(sr.wait_until(0, Deadline::after(5), go_on) == Blocked::kDone);
  writer.join();
  CHECK(w->held_depth() == 0);
  std::vector<uint64_t> got(4);
  Snapshot snap;
  CHECK(sr.read(got.data(), false, Deadline::after(1), go_on, &snap) == Blocked::kDone);
  CHECK(snap.count == 1 && snap.frame_id == 9 && got[3] == 3 && r->held_depth() == 0);
  CHECK(Stream::unlink_name(name));
  CHECK(sr.wait_until(1, Deadline::after(5), go_on) == Blocked::kGone);
}

// GapEstimator (wait_policy.h): spins while nothing is known, parks at
// once against a paced writer, spins for back-to-back publications, parks
// when the writer is long overdue, and forgets one long pause within a few
// publications.
void test_gap_estimator() {
  const double budget = 50e-6;
  const int64_t us = 1000, ms = 1000 * us;
  GapEstimator paced;
  CHECK(paced.gap_ns() < 0 && paced.spin_for(0, budget) == budget);
  int64_t t = 1'000'000'000'000;
  paced.observe(7, t);  // first publication seen: still unknown
  CHECK(paced.gap_ns() < 0 && paced.spin_for(t + 10 * us, budget) == budget);
  for (uint64_t c = 8; c < 20; ++c) paced.observe(c, t += ms);
  CHECK(std::fabs(paced.gap_ns() - 1e6) < 1e3);
  CHECK(paced.spin_for(t + 20 * us, budget) == 0);        // next one in ~980 us
  CHECK(paced.spin_for(t + 980 * us, budget) == budget);  // due within the budget
  CHECK(paced.spin_for(t + 1030 * us, budget) == budget);  // a little late
  CHECK(paced.spin_for(t + 10 * ms, budget) == 0);        // writer paused
  paced.observe(19, t + 5 * ms);  // no newer count: no sample
  CHECK(std::fabs(paced.gap_ns() - 1e6) < 1e3);
  paced.observe(29, t + 10 * ms);  // ten at once: one sample of their mean gap
  CHECK(std::fabs(paced.gap_ns() - 1e6) < 1e3);

  GapEstimator pingpong;
  t = 5'000'000'000'000;
  for (uint64_t c = 1; c < 50; ++c) pingpong.observe(c, t += 12 * us);
  CHECK(pingpong.spin_for(t + 3 * us, budget) == budget);
  CHECK(pingpong.spin_for(t + 40 * us, budget) == budget);  // late, not paused
  pingpong.observe(50, t += 2'000 * ms);  // a 2 s pause between exchanges
  CHECK(pingpong.spin_for(t + 3 * us, budget) == 0);
  int rounds = 0;
  for (uint64_t c = 51; pingpong.spin_for(t + 3 * us, budget) == 0; ++c) {
    pingpong.observe(c, t += 12 * us);
    CHECK(++rounds < 12);
  }
  pingpong.observe(100, t - 5 * ms);  // the clock stepped back: a 1 ns sample
  CHECK(pingpong.gap_ns() >= 1 && pingpong.gap_ns() < 12 * us);
  CHECK(pingpong.spin_for(t - 5 * ms + 2 * us, budget) == budget);
}

// Readiness descriptors: readable exactly while something newer than the
// armed count exists; a failed claim (table full) leaves others' entries.
bool fd_readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

void test_notify() {
  using torch_shmem::core::Notifier;
  const std::string name = stream_name("notify");
  Stream::unlink_name(name);
  std::unique_ptr<Stream> w(Stream::create(name, geometry_u64(4)));
  std::unique_ptr<Stream> r(Stream::open(name, true));
  std::vector<std::unique_ptr<Notifier>> ns;
  for (uint32_t i = 0; i < torch_shmem::core::kMaxNotify; ++i) {
    ns.push_back(Notifier::attach(*r));
    ns.back()->rearm(0);
  }
  CHECK(w->header()->armed_readers.load() == torch_shmem::core::kMaxNotify);
  bool full = false;
  try {
    Notifier::attach(*r);
  } catch (const Error& e) {
    full = e.kind() == ErrorKind::kState;
  }
  CHECK(full);
  for (auto& n : ns) CHECK(!fd_readable(n->fd()));
  std::vector<uint64_t> f(4, 1);
  CHECK(w->lock_for(1));
  CHECK(w->write_locked(f.data(), false, 0) == 1);
  w->unlock();
  for (auto& n : ns) CHECK(fd_readable(n->fd()));  // all 64, entry 0 included
  CHECK(w->header()->armed_readers.load() == 0);    // each signalled once
  ns[0]->rearm(1);
  CHECK(!fd_readable(ns[0]->fd()));
  ns[1]->rearm(0);  // already newer than 0: readable at once, not armed
  CHECK(fd_readable(ns[1]->fd()));
  CHECK(w->header()->armed_readers.load() == 1);
  const int32_t pid0 = w->header()->notify[0].pid.load();
  ns.clear();  // releases every entry
  CHECK(pid0 == getpid());
  CHECK(w->header()->armed_readers.load() == 0);
  for (const auto& e : w->header()->notify) CHECK(e.pid.load() == 0 && e.armed.load() == 0);
  CHECK(Stream::unlink_name(name));
}

void test_unlink_ends_waits() {
  const std::string name = stream_name("unlinkwait");
  Stream::unlink_name(name);
  std::unique_ptr<Stream> w(Stream::create(name, geometry_u64(4)));
  std::unique_ptr<Stream> r(Stream::open(name, true));
  uint8_t iid[16];
  std::memcpy(iid, r->geometry()->instance_id, 16);
  CHECK(Stream::name_state(name, iid) == Stream::NameState::kSame);
  std::atomic<int> result{-1};
  std::atomic<double> waited{0};
  std::thread waiter([&] {
    // One slice of 10 s: only the wake sent by unlink_name ends it early.
    bool gone = false;
    const double t0 = torch_shmem::core::now_monotonic();
    const bool newer = r->wait_slice(0, 0, 10.0, &gone);
    waited = torch_shmem::core::now_monotonic() - t0;
    result = !newer && gone ? 1 : 0;
  });
  while (r->header()->waiters.load() == 0) std::this_thread::yield();
  CHECK(Stream::unlink_name(name));
  waiter.join();
  CHECK(result == 1 && r->unlinked());
  CHECK(waited < 5.0);
  bool gone = false;
  CHECK(!r->wait_slice(0, 0, 5, &gone) && gone);  // at once, not after 5 s
  CHECK(!r->wait_slice(0, 0, 0.001) && r->count() == 0);  // without `gone`: as before
  CHECK(w->lock_for(1));
  std::vector<uint64_t> f(4, 7);
  CHECK(w->write_locked(f.data(), false, 0) == 1);  // an old handle still publishes
  w->unlock();
  gone = true;
  CHECK(r->wait_slice(0, 0, 5, &gone) && !gone);
  CHECK(Stream::name_state(name, iid) == Stream::NameState::kGone);
  std::unique_ptr<Stream> again(Stream::create(name, geometry_u64(2)));
  CHECK(Stream::name_state(name, iid) == Stream::NameState::kOther);
  CHECK(Stream::unlink_name(name));
}

void test_header_fuzz(int iterations, std::mt19937_64& rng) {
  const std::string name = stream_name("fuzz");
  Stream::unlink_name(name);
  const int64_t shapes[] = {0, 1, 3, 512, 513, 5000};
  int opened = 0, refused = 0;
  for (int it = 0; it < iterations; ++it) {
    CreateOptions g = geometry_u64(shapes[it % 6]);
    if (it % 4 == 1) {
      g.dtype_code = kUInt8;
      g.ndim = 3;
      g.shape[0] = 2;
      g.shape[1] = shapes[it % 6];
      g.shape[2] = 3;
    }
    delete Stream::create(name, g);
    const std::string path = path_of(name);
    std::vector<unsigned char> bytes = read_file(path);
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t off;
      switch (rng() % 4) {
        case 0: off = rng() % 1024; break;                      // geometry
        case 1: off = 1024 + rng() % (kHeaderBytes - 1024); break;  // hot lines
        case 2: off = 24 + 8 * (rng() % 10); break;              // sizes and codes
        default: off = rng() % kHeaderBytes; break;
      }
      size_t len = 1 + rng() % 16;
      for (size_t i = 0; i < len && off + i < kHeaderBytes; ++i) {
        uint64_t pick = rng() % 5;
        bytes[off + i] = pick == 0 ? 0 : pick == 1 ? 0xff : static_cast<unsigned char>(rng());
      }
    }
    if (rng() % 2) fix_checksum(&bytes);  // let the deeper checks run
    if (rng() % 8 == 0) {                 // truncate or extend too
      size_t size = rng() % 3 == 0 ? kHeaderBytes : bytes.size() + 4096 * (rng() % 3) - 4096;
      if (size < kHeaderBytes) size = kHeaderBytes;
      bytes.resize(size, 0);
    }
    write_file(path, bytes);
    std::unique_ptr<Stream> s;
    try {
      s.reset(Stream::open(name, rng() % 2));
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::kValue);
      ++refused;
    }
    if (s) {
      ++opened;
      const Header* geo = s->geometry();
      uint64_t n = geo->itemsize;
      for (uint32_t i = 0; i < geo->ndim; ++i) n *= static_cast<uint64_t>(geo->shape[i]);
      CHECK(n == s->payload_bytes() && n <= kMaxPayloadBytes);
      if (!s->readonly()) drive(s.get());
    }
    s.reset();
    Stream::unlink_name(name);
  }
  std::printf("header fuzz: %d iterations, %d opened, %d refused\n", iterations, opened, refused);
}

void test_crafted_headers() {
  const std::string name = stream_name("craft");
  Stream::unlink_name(name);
  CreateOptions g;
  g.dtype_code = kInt16;
  g.ndim = 1;
  g.shape[0] = 4;
  delete Stream::create(name, g);
  std::vector<unsigned char> bytes = read_file(path_of(name));
  Header* h = reinterpret_cast<Header*>(bytes.data());
  h->payload_bytes = ~uint64_t(0) - 1;  // 2**64 - 2 = 2 * (2**63 - 1)
  h->shape[0] = INT64_MAX;
  h->segment_bytes = kHeaderBytes;
  bytes.resize(kHeaderBytes);
  fix_checksum(&bytes);
  write_file(path_of(name), bytes);
  bool refused = false;
  try {
    delete Stream::open(name, false);
  } catch (const Error& e) {
    refused = e.kind() == ErrorKind::kValue;
  }
  CHECK(refused);
  Stream::unlink_name(name);
}

void test_threads() {
  const std::string name = stream_name("threads");
  Stream::unlink_name(name);
  const size_t n = 64 * 1024;
  std::unique_ptr<Stream> s(Stream::create(name, geometry_u64(n)));
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0}, writes{0}, torn{0};
  std::vector<std::thread> ts;
  for (int w = 0; w < 2; ++w)
    ts.emplace_back([&] {
      std::unique_ptr<Stream> h(Stream::open(name, false));
      std::vector<uint64_t> f(n);
      while (!stop.load()) {
        CHECK(h->lock_for(5));
        make_frame(h->count() + 1, &f);
        h->write_locked(f.data(), true, h->count() + 1);
        h->unlock();
        writes.fetch_add(1);
      }
    });
  for (int r = 0; r < 2; ++r)
    ts.emplace_back([&] {
      std::unique_ptr<Stream> h(Stream::open(name, true));
      std::vector<uint64_t> f(n);
      while (!stop.load()) {
        Snapshot snap;
        bool ok = h->read_fast(f.data(), &snap);
        if (!ok) {
          CHECK(h->lock_for(5));
          snap = h->read_locked(f.data());
          h->unlock();
        }
        if (snap.count > 0 && (!frame_ok(f) || f[0] != snap.count)) torn.fetch_add(1);
        reads.fetch_add(1);
        h->wait_slice(snap.count, 0, 0.001);
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  stop = true;
  for (auto& t : ts) t.join();
  CHECK(torn.load() == 0 && reads.load() > 0 && writes.load() > 0);
  CHECK(s->count() == static_cast<uint64_t>(writes.load()));
  std::printf("threads: %ld writes, %ld reads verified, 0 torn\n", writes.load(), reads.load());
  Stream::unlink_name(name);
}

void test_kill_mid_write() {
  const std::string name = stream_name("kill");
  Stream::unlink_name(name);
  const size_t n = 1 << 16;
  std::unique_ptr<Stream> s(Stream::create(name, geometry_u64(n)));
  std::vector<uint64_t> f(n);
  make_frame(1, &f);
  CHECK(s->lock_for(1));
  s->write_locked(f.data(), false, 0);
  s->unlock();
  int ready[2];
  CHECK(pipe(ready) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    std::unique_ptr<Stream> c(Stream::open(name, false));
    c->lock_for(5);
    c->begin_write_locked();
    std::memset(c->payload(), 0xAB, c->payload_bytes() / 2);
    char x = 1;
    (void)!write(ready[1], &x, 1);
    pause();
    _exit(0);
  }
  char x;
  CHECK(read(ready[0], &x, 1) == 1);
  kill(pid, SIGKILL);
  int status;
  waitpid(pid, &status, 0);
  CHECK(s->lock_for(1));  // taken over at once from the dead holder
  bool inconsistent = false;
  try {
    s->read_locked(f.data());
  } catch (const Error& e) {
    inconsistent = e.kind() == ErrorKind::kInconsistent;
  }
  CHECK(inconsistent);
  make_frame(2, &f);
  CHECK(s->write_locked(f.data(), false, 0) == 2);  // repairs, counts once
  s->unlock();
  Snapshot snap;
  std::vector<uint64_t> got(n);
  CHECK(s->read_fast(got.data(), &snap) && frame_ok(got) && got[0] == 2);
  close(ready[0]);
  close(ready[1]);
  Stream::unlink_name(name);
}

void test_slots() {
  const std::string name = stream_name("slots");
  Stream::unlink_name(name);
  shm_unlink(sim_device_name(name).c_str());
  CreateOptions g = geometry_u64(100);
  g.flags = kFlagGpu | kFlagSimDevice | kFlagCpuMirror;
  g.nslots = 3;
  HostSlotMemory* mem = nullptr;
  g.init_device = [&](Header* h) { mem = HostSlotMemory::create(name, h->device_bytes, 0600); };
  std::unique_ptr<Stream> s(Stream::create(name, g));
  std::unique_ptr<HostSlotMemory> m(mem);
  m->set_geometry(s->geometry()->slot_stride, s->geometry()->payload_bytes);
  std::vector<uint64_t> f(100), got(100);
  for (uint64_t k = 1; k <= 20; ++k) {
    make_frame(k, &f);
    CHECK(s->lock_for(1));
    CHECK(slot_write_locked(*s, *m, f.data(), false, true, k) == k);
    s->unlock();
    Snapshot snap;
    CHECK(slot_read_fast(*s, *m, got.data(), false, &snap));
    CHECK(frame_ok(got) && got[0] == k && snap.count == k);
  }
  Stream::unlink_name(name);
}

}  // namespace

int main(int argc, char** argv) {
  int iterations = argc > 1 ? std::atoi(argv[1]) : 2000;
  uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : std::random_device{}();
  std::printf("seed=%llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  g_prefix = "cpp-" + std::to_string(getpid()) + "-";
  test_basics();
  test_gap_estimator();
  test_unlink_ends_waits();
  test_session();
  test_header_fuzz(iterations, rng);
  test_crafted_headers();
  test_threads();
  test_kill_mid_write();
  test_slots();
  test_notify();
  std::printf("ok: %d checks\n", g_checks);
  return 0;
}
