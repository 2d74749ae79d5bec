#include "session.h"

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <string>
#include <vector>

namespace torch_shmem {
namespace core {

namespace {

std::string seconds_text(double s) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%.3g", s);
  return buf;
}

// The next slice: at most `longest`, never past the deadline, never < 0.
double slice_of(const Deadline& d, double longest) {
  return std::max(0.0, std::min(longest, d.remaining()));
}

}  // namespace

uint64_t Session::clear_locked() const {
  if (slots_ == nullptr) return s_.clear_locked();
  std::vector<uint8_t> zeros(s_.geometry()->payload_bytes);
  return slot_write_locked(s_, *slots_, zeros.data(), false, false, 0);
}

Blocked Session::lock_until(const Deadline& d, Interrupt interrupt) const {
  if (s_.lock_for(0)) return Blocked::kDone;
  for (;;) {
    if (!interrupt()) return Blocked::kInterrupted;
    if (d.passed())
      throw Error(ErrorKind::kTimeout,
                  "timed out after " + seconds_text(d.timeout) +
                      " s waiting for the write lock (held by pid " +
                      std::to_string(s_.header()->owner_pid.load(std::memory_order_relaxed)) +
                      ")");
    if (s_.lock_for(slice_of(d, kLockSlice))) return Blocked::kDone;
  }
}

SpinMode spin_mode() {
  static const SpinMode mode = [] {
    const std::string v = spin_mode_text();
    if (v.empty() || v == "adaptive") return SpinMode::kAdaptive;
    if (v == "always") return SpinMode::kAlways;
    if (v == "off") return SpinMode::kOff;
    return SpinMode::kInvalid;
  }();
  return mode;
}

const char* spin_mode_text() {
  static const std::string text = [] {
    const char* v = std::getenv("TORCH_SHMEM_WAIT_SPIN");
    return std::string(v == nullptr ? "" : v);
  }();
  return text.c_str();
}

double Session::wait_spin() const {
  switch (spin_mode()) {
    case SpinMode::kAlways:
      return kWaitSpin;
    case SpinMode::kOff:
      return 0;
    case SpinMode::kInvalid:
      throw Error(ErrorKind::kValue, std::string("stream '") + s_.name() +
                                         "': environment variable TORCH_SHMEM_WAIT_SPIN='" +
                                         spin_mode_text() +
                                         "' is not one of 'adaptive', 'always', 'off'");
    case SpinMode::kAdaptive:
      break;
  }
  GapEstimator& gaps = s_.gaps();
  uint64_t count = 0;
  int64_t t = 0;
  if (s_.latest_publication(&count, &t)) gaps.observe(count, t);
  return gaps.spin_for(now_realtime_ns(), kWaitSpin);
}

Blocked Session::wait_until(uint64_t after, const Deadline& d, Interrupt interrupt,
                            double spin) const {
  if (spin < 0) spin = wait_spin();
  for (;;) {
    bool gone = false;
    if (s_.wait_slice(after, spin, slice_of(d, kWaitSlice), &gone)) return Blocked::kDone;
    if (gone) return Blocked::kGone;
    spin = 0;
    if (!interrupt()) return Blocked::kInterrupted;
    if (d.passed())
      throw Error(ErrorKind::kTimeout, "timed out after " + seconds_text(d.timeout) +
                                           " s waiting for a write newer than count " +
                                           std::to_string(after));
  }
}

Blocked Session::read(void* dst, bool dst_on_device, const Deadline& d, Interrupt interrupt,
                      Snapshot* snap) const {
  if (read_fast(dst, dst_on_device, snap)) return Blocked::kDone;
  // The writer keeps winning (or died mid-write): take the lock.
  Blocked b = lock_until(d, interrupt);
  if (b != Blocked::kDone) return b;
  LockGuard held(s_);
  *snap = read_locked(dst, dst_on_device);
  return Blocked::kDone;
}

}  // namespace core
}  // namespace torch_shmem
