// Adaptive spinning for waits (docs/design.md, "Waiting for a publication"):
// whether a wait spins before it parks on the futex, decided from the
// inter-arrival times of the publications a mapping has seen.
//
// A spin only pays when the publication comes within it (ping-pong,
// back-to-back writers); against a paced or idle writer it burns its whole
// budget on every wait. GapEstimator keeps an exponentially weighted
// estimate of the gap between publications, taken from the header's count
// and write time at the start of each wait, and spins only when the next
// publication is expected within the budget.
//
// Only the decision to spin comes from here: the futex protocol
// (Stream::wait_slice) is the same whatever it says, so a wrong guess costs
// latency or CPU, never a wake-up.
#pragma once

#include <stdint.h>

#include <atomic>
#include <cmath>

namespace torch_shmem {
namespace core {

// TORCH_SHMEM_WAIT_SPIN, read once per process: "adaptive" (default, or
// unset/empty), "always" (spin the whole budget on every wait), "off"
// (never spin: park at once). Anything else is kInvalid, and waits refuse
// to run (ValueError naming the variable and the accepted values).
enum class SpinMode { kAdaptive, kAlways, kOff, kInvalid };
SpinMode spin_mode();
const char* spin_mode_text();  // the variable's value as read ("" when unset)

class GapEstimator {
 public:
  // Weight of a new sample in the (log-domain) moving average.
  static constexpr double kAlpha = 0.25;
  // A publication overdue by more than this many gaps (plus the budget)
  // means the writer paused: park.
  static constexpr double kOverdueGaps = 4;

  // The latest publication is `count`, written at write_time_ns (realtime
  // clock, Header::write_time_ns). A count past the last one seen adds one
  // sample: the mean gap over the publications in between. Threads that
  // share a mapping may race here; that can only blur the estimate.
  void observe(uint64_t count, int64_t write_time_ns) {
    const uint64_t c0 = count_.load(std::memory_order_relaxed);
    const int64_t t0 = time_ns_.load(std::memory_order_relaxed);
    if (count <= c0) return;
    count_.store(count, std::memory_order_relaxed);
    time_ns_.store(write_time_ns, std::memory_order_relaxed);
    if (c0 == 0) return;  // first publication seen: no gap yet
    double sample = double(write_time_ns - t0) / double(count - c0);
    if (!(sample >= 1)) sample = 1;  // same nanosecond, or the clock stepped back
    // Geometric average: one long pause in a ping-pong stream is forgotten
    // after a few publications instead of dominating for dozens.
    const double l = std::log2(sample);
    const double g = log2_gap_.load(std::memory_order_relaxed);
    log2_gap_.store(g < 0 ? l : g + kAlpha * (l - g), std::memory_order_relaxed);
  }

  // Estimated gap between publications in ns; < 0 while unknown (fewer
  // than two publications seen).
  double gap_ns() const {
    const double g = log2_gap_.load(std::memory_order_relaxed);
    return g < 0 ? -1 : std::exp2(g);
  }

  // How long a wait starting at now_ns (realtime) spins: `budget` seconds
  // when the next publication is expected within it (or nothing is known
  // yet), 0 when it is expected later, or is so overdue that the writer
  // must have paused.
  double spin_for(int64_t now_ns, double budget) const {
    const double gap = gap_ns();
    if (gap < 0) return budget;
    const double budget_ns = budget * 1e9;
    const double due =
        double(time_ns_.load(std::memory_order_relaxed) - now_ns) + gap;  // ns from now
    if (due > budget_ns) return 0;
    if (due < -(kOverdueGaps * gap + budget_ns)) return 0;
    return budget;
  }

 private:
  std::atomic<uint64_t> count_{0};
  std::atomic<int64_t> time_ns_{0};
  std::atomic<double> log2_gap_{-1};  // log2 of the gap in ns; < 0: unknown
};

}  // namespace core
}  // namespace torch_shmem
