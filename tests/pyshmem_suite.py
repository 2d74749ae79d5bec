"""pyshmem 1.4.0's own test suite, run unchanged against torch_shmem.

    python -m tests.pyshmem_suite            # CPU part: pyshmem's tests/test_cpu_api.py
    python -m tests.pyshmem_suite --gpu      # GPU part: tests/test_gpu_api.py (skips without CUDA)
    python -m tests.pyshmem_suite --fetch-only [--dest DIR]   # obtain and verify the sdist

Run from the repository root. Exit status: 0 when every test that is not
excluded passed (or was skipped by pyshmem's own platform conditions), 1
on failures, 5 when the sdist cannot be obtained (offline, no copy).

How it works:

- The sdist is pyshmem-1.4.0.tar.gz, pinned by sha256. It is taken from
  $TORCH_SHMEM_PYSHMEM_SDIST, else bench/wheels/ (``make gpu-wheels`` puts
  a copy there for machines without a package index), else the cache
  ($XDG_CACHE_HOME or ~/.cache)/torch_shmem/, else downloaded into that
  cache with ``pip download --require-hashes``. Every copy is hash-checked.
- Its tests/ files are copied into a fresh temporary directory next to a
  generated ``src/pyshmem`` shim whose ``__init__`` re-exports torch_shmem
  (pyshmem's tests put ``../src`` on PYTHONPATH for their child processes,
  so the children import the shim too). The shim goes first on PYTHONPATH
  for that run only; nothing is installed, and the plugin
  (tests/_pyshmem_compat_plugin.py) refuses to run if ``import pyshmem``
  resolves anywhere else (e.g. to a pyshmem installed in the venv).
- pytest runs there in a subprocess, in a private /dev/shm (a tmpfs in a
  new mount namespace) where ``unshare`` and ``mount`` are permitted, so
  the suite's ``purge()`` calls cannot remove other processes' streams.
  Where they are not, the one test that calls ``purge()`` for real is
  skipped (CONDITIONAL below). TORCH_SHMEM_COMPAT_ISOLATE=0 turns the
  private /dev/shm off.
- EXCLUDED lists, per file, the tests that are not run and why. The run
  fails if an exclusion names no test.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import tempfile
from pathlib import Path

PYSHMEM_VERSION = "1.4.0"
SDIST_NAME = f"pyshmem-{PYSHMEM_VERSION}.tar.gz"
SDIST_SHA256 = "d77117e380f6092231c6ad2dd7a1b2d669151c53062da633232029c33967f3e1"

REPO = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().with_name("_pyshmem_compat_plugin.py")
PARTS = {"cpu": "test_cpu_api.py", "gpu": "test_gpu_api.py"}
EXIT_UNAVAILABLE = 5

# ------------------------------------------------------------------ exclusions
# Each entry: test function name (all its parametrizations) -> why it is not
# run. Most exercise pyshmem's private module pyshmem._shared or private
# attributes of its handles, i.e. how pyshmem is built rather than what its
# API does; the others are listed one by one under OTHER.

INTERNALS = "pyshmem internals: "
_LAYOUT = (
    INTERNALS + "builds, reads or corrupts pyshmem's private segment layout (ps_<hash> data "
    "and _meta segments, METADATA_V3_DTYPE header, header CRC, legacy v2 header) through "
    "pyshmem._shared; torch_shmem has one segment per stream with its own header "
    "(docs/design.md), fuzzed by tests/test_reliability_fuzz.py")
_SEGMENT_NAME = (
    INTERNALS + "uses pyshmem._shared._segment_base_name (pyshmem's hashed segment ids); "
    "torch_shmem's segment of a stream is /dev/shm/torch_shmem.<name>")
_SHARED_MEMORY = (
    INTERNALS + "tests pyshmem's multiprocessing.shared_memory / resource_tracker plumbing "
    "(pyshmem._shared._attach_segment, _unregister); torch_shmem maps its segments "
    "natively and never registers them with the resource tracker")
_LOCK_FILES = (
    INTERNALS + "inspects pyshmem's private lock state (handle._lock_state, lock files, "
    "PYSHMEM_LOCK_DIR, per-name thread locks); torch_shmem's lock is a robust "
    "process-shared mutex in the segment header, with no lock files")
_WRITE_HOOKS = (
    INTERNALS + "drives a write through pyshmem's private hooks (handle._mark_write_started, "
    "_finish_write, _abort_write, _array); torn and interrupted writes are tested by "
    "tests/test_reliability_crash.py, test_reliability_fuzz.py and test_multiprocess.py")
_PATCHED = (
    INTERNALS + "monkeypatches pyshmem._shared internals (the names it patches do not exist "
    "in torch_shmem, whose publication path is in C++)")
_CUDA_SWEEP = (
    INTERNALS + "calls pyshmem._shared's private CUDA-orphan helpers directly; the behaviour "
    "is tested through the public purge(include_cuda_orphans=True) by "
    "test_purge_only_removes_cuda_orphans_when_explicitly_requested and tests/test_parity.py")
_PYSHMEM_TEXT = (
    "asserts that the message names the pyshmem module ('pyshmem.create(...)' / 'use "
    "pyshmem.open(...)'); torch_shmem's message names torch_shmem.create / torch_shmem.open "
    "and otherwise matches")
_GPU_INTERNALS = (
    INTERNALS + "inspects or patches pyshmem's private GPU machinery (pyshmem._shared, "
    "handle._gpu_tensor, _cuda_sync_events, pickled CUDA handles); torch_shmem's GPU "
    "streams are device slots driven by torch.ops.shmem (docs/gpu.md)")
_GPU_PENDING = (
    "excluded pending GPU-stream parity of the SharedMemory API: GPU handles here raise "
    "'not supported' for write_view() and read_publication() and have no pinned_buffer() "
    "(docs/api.md, compatibility table)")

EXCLUDED: dict[str, dict[str, str]] = {
    "test_cpu_api.py": {
        # OTHER: not about internals; each is an intended difference
        "test_public_version_matches_installed_distribution": (
            "compares pyshmem.__version__ with the installed pyshmem distribution's metadata; "
            "the shim is generated, not an installed distribution, and __version__ is "
            "torch_shmem's own version"),
        "test_open_reports_clear_error_for_missing_name": _PYSHMEM_TEXT,
        "test_create_reports_clear_error_for_existing_name": _PYSHMEM_TEXT,
        "test_cli_no_command_exits_nonzero": (
            "expects exit status 1 without a subcommand; the torch-shmem command exits 2 on "
            "usage errors (argparse convention, docs/cli.md)"),
        "test_cli_purge_cuda_orphans_requires_explicit_flag": (
            "replaces pyshmem.purge by monkeypatching the module and expects the CLI to call "
            "it; torch-shmem's purge calls torch_shmem._admin directly (the patch would not "
            "apply and every stream of this user would really be removed)"),
        "test_cross_process_writers_and_readers_never_tear": (
            "timing: stops its 5 spawned processes 1.5 s after starting them, before they "
            "have necessarily imported numpy, pytest and the test module (about 0.8 s of CPU "
            "each); on a loaded 2-core machine none has started by then and 'reads > 0' "
            "fails with 0 reads and 0 writes. Cross-process tearing is tested by "
            "tests/test_multiprocess.py::test_no_torn_reads_across_processes"),
        # private segment layout and names
        "test_list_streams_includes_user_visible_name_of_created_stream": _SEGMENT_NAME,
        "test_list_streams_segment_absent_after_unlink": _SEGMENT_NAME,
        "test_metadata_round_trips_user_visible_name": _SEGMENT_NAME,
        "test_cli_list_shows_created_stream_name": _SEGMENT_NAME,
        "test_purge_removes_stream_segments_and_reports_name": _SEGMENT_NAME,
        "test_create_rejects_name_too_long_for_metadata": (
            INTERNALS + "uses pyshmem._shared.METADATA_NAME_MAX, pyshmem's private name limit "
            "(torch_shmem allows 200 UTF-8 bytes, tested by tests/test_reliability_fuzz.py)"),
        "test_new_stream_uses_fixed_width_v3_metadata": _LAYOUT,
        "test_open_accepts_legacy_v2_metadata": _LAYOUT,
        "test_open_rejects_corrupt_v3_metadata": _LAYOUT,
        "test_open_rejects_unused_shape": _LAYOUT,
        "test_frame_id_writes_do_not_disturb_header_crc": _LAYOUT,
        "test_open_rejects_metadata_name_mismatch": _LAYOUT,
        "test_new_stream_stamps_header_crc": _LAYOUT,
        "test_open_rejects_silent_bitflip_via_header_crc": _LAYOUT,
        "test_header_crc_flag_required_when_checksum_present": _LAYOUT,
        "test_discovery_ignores_corrupt_header_crc": _LAYOUT,
        "test_open_rejects_data_segment_size_mismatch": _LAYOUT,
        "test_open_rejects_truncated_metadata_segment": _LAYOUT,
        "test_hot_path_counters_are_8_byte_aligned": _LAYOUT,
        "test_read_stream_name_returns_none_for_legacy_short_segment": _LAYOUT,
        "test_purge_preserves_unvalidated_ps_prefixed_segments": _LAYOUT,
        # multiprocessing.shared_memory plumbing
        "test_unregister_uses_platform_expected_shared_memory_name": _SHARED_MEMORY,
        "test_supports_track_matches_shared_memory_signature": _SHARED_MEMORY,
        "test_attach_segment_uses_track_false_when_supported": _SHARED_MEMORY,
        "test_attach_segment_falls_back_to_unregister_when_unsupported": _SHARED_MEMORY,
        # lock files and per-name lock state
        "test_locked_many_validates_and_honors_poll_interval": _LOCK_FILES,
        "test_locked_releases_the_lock_when_the_block_raises": _LOCK_FILES,
        "test_locked_many_releases_acquired_locks_when_one_times_out": _LOCK_FILES,
        "test_locked_many_accepts_duck_typed_handles": _LOCK_FILES + (
            "; also, locked_many() here takes SharedMemory handles only (TypeError otherwise)"),
        "test_lock_path_default_includes_uid_prefix": _LOCK_FILES,
        "test_lock_path_uses_pyshmem_lock_dir_env_var": _LOCK_FILES,
        "test_last_close_releases_per_name_lock_file_descriptor": _LOCK_FILES,
        "test_refresh_if_stale_rebinds_new_inode": _LOCK_FILES,
        "test_refresh_if_stale_recreates_a_removed_lock_file": _LOCK_FILES,
        "test_acquire_reconverges_after_unlink_recreate": _LOCK_FILES,
        "test_unlink_recreate_preserves_name_lock_inode": _LOCK_FILES,
        "test_fork_resets_inherited_lock_state": _LOCK_FILES,
        "test_finalizer_during_lock_setup_does_not_deadlock": _LOCK_FILES,
        "test_finalizer_under_lock_guard_does_not_deadlock": _LOCK_FILES,
        # private write hooks and patched internals of the publication path
        "test_read_new_waits_for_in_progress_write_to_complete": _WRITE_HOOKS,
        "test_read_timeout_bounds_in_progress_write": _WRITE_HOOKS,
        "test_reader_detects_writer_process_crash_mid_write": _WRITE_HOOKS,
        "test_repeated_writer_kills_recover_each_time": _WRITE_HOOKS,
        "test_notify_read_new_detects_writer_crash_mid_write": _WRITE_HOOKS,
        "test_failed_write_is_invalid_until_replaced": _PATCHED,
        "test_notify_wait_sees_publication_between_check_and_park": _PATCHED,
        "test_notify_read_new_sees_publication_between_check_and_park": _PATCHED,
        "test_native_publication_path_avoids_file_barrier": _PATCHED,
        "test_publication_file_barrier_fallback": _PATCHED,
        "test_pid_liveness_never_signals_on_windows": (
            INTERNALS + "monkeypatches pyshmem._shared.os and _windows_pid_is_alive (pyshmem's "
            "Windows liveness probe); torch_shmem runs on Linux only"),
        # other private helpers
        "test_remove_orphaned_cuda_ipc_files_returns_removed_basenames": _CUDA_SWEEP,
        "test_remove_orphaned_cuda_ipc_files_skips_live_producer_files": _CUDA_SWEEP,
        "test_cuda_ipc_file_producer_pid_parsing": _CUDA_SWEEP,
        "test_restricted_cuda_unpickler_rejects_dangerous_globals": (
            INTERNALS + "tests pyshmem._shared._loads_cuda_handle; torch_shmem never pickles "
            "CUDA handles"),
        "test_gpu_supported_dtypes_contains_torch_mapped_types": (
            INTERNALS + "compares with pyshmem._shared.DTYPE_TABLE; GPU_SUPPORTED_DTYPES itself "
            "is tested by test_gpu_supported_dtypes_is_public_frozenset and tests/test_parity.py"),
    },
    "test_gpu_api.py": {
        "test_open_reports_clear_error_for_missing_name": _PYSHMEM_TEXT,
        "test_create_reports_clear_error_for_existing_name": _PYSHMEM_TEXT,
        "test_spawned_process_gpu_benchmark_smoke": (
            "runs pyshmem's own benchmark harness (benchmarks/benchmark_ipc.py of its "
            "repository) and checks its pyshmem_gpu result; not an API test"),
        "test_numpy_gpu_write_source_stays_on_cpu": _GPU_INTERNALS,
        "test_open_rejects_tampered_gpu_handle_payload": _GPU_INTERNALS,
        "test_cuda_failure_during_publication_is_recoverable": _GPU_INTERNALS,
        "test_gpu_completion_event_is_reused_per_thread_and_stream": _GPU_INTERNALS,
        "test_gpu_completion_events_are_not_shared_by_concurrent_threads": _GPU_INTERNALS,
        "test_create_removes_gpu_tensor_cache_entry_on_post_creation_failure": _GPU_INTERNALS,
        "test_gpu_owner_keeps_tensor_on_close_but_drops_on_unlink": _GPU_INTERNALS,
        "test_gpu_consumer_releases_tensor_on_close": _GPU_INTERNALS,
        "test_purge_preserves_cuda_ipc_files_of_live_stream": _CUDA_SWEEP,
        "test_gpu_safe_read_waits_for_even_write_sequence": _WRITE_HOOKS,
        "test_gpu_frame_id_round_trips": _GPU_PENDING,
        "test_gpu_publication_snapshot_owns_matching_payload_and_metadata": _GPU_PENDING,
        "test_pinned_buffer_is_reused_and_writable": _GPU_PENDING,
        "test_readonly_gpu_handle_can_snapshot_but_not_mutate": _GPU_PENDING,
        "test_gpu_write_view_publishes_shared_tensor_and_mirror": _GPU_PENDING,
    },
}

# Excluded only where the run cannot have a private /dev/shm: the test calls
# purge(), which removes every stream of this user on the machine.
CONDITIONAL: dict[str, dict[str, str]] = {
    "test_cpu_api.py": {
        "test_purge_only_removes_cuda_orphans_when_explicitly_requested": (
            "calls purge(), which would remove every stream of this user on the machine; it "
            "runs only in a private /dev/shm, which needs unshare and mount (root or user "
            "namespaces)"),
    },
}

# ------------------------------------------------------------------ the shim
SHIM_FILES = {
    "__init__.py": '''\
"""Generated by torch_shmem's tests/pyshmem_suite.py: pyshmem's name for torch_shmem.

Exists only for the run of pyshmem's own tests against torch_shmem; never
installed.
"""

from torch_shmem import *  # noqa: F401,F403
from torch_shmem import __all__, __getattr__, __version__  # noqa: F401
''',
    # pyshmem's test modules import pyshmem._shared at the top and read one
    # flag of it in skipif conditions; the tests that use anything else of it
    # are excluded.
    "_shared.py": '''\
"""Generated stand-in for pyshmem's private module, imported by pyshmem's tests.

Only _FUTEX_AVAILABLE: pyshmem parks notify=True waits on a futex where one
exists; torch_shmem parks every wait on a futex (Linux only).
"""

_FUTEX_AVAILABLE = True
''',
    # pyshmem's console script is pyshmem._cli:main; torch_shmem's is the
    # torch-shmem command (same unlink/list/purge subcommands, and more).
    "_cli.py": '''\
"""Generated: pyshmem's CLI entry point is torch_shmem's torch-shmem command."""

from torch_shmem.cli import main  # noqa: F401
''',
}


class Unavailable(Exception):
    """The sdist cannot be obtained here (offline and no copy): skip, saying why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_shmem"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path) -> Path:
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise ValueError(
            f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256} of "
            f"{SDIST_NAME}; remove the file to fetch it again"
        )
    return path


def fetch_sdist(*, cache: Path | None = None, pip: list[str] | None = None,
                timeout: float = 180.0) -> Path:
    """Path of the verified pyshmem 1.4.0 sdist (see the module docstring for the order).

    Raises Unavailable when it is not present and cannot be downloaded, and
    ValueError when a copy (or the download) does not match the pinned hash.
    """
    explicit = os.environ.get("TORCH_SHMEM_PYSHMEM_SDIST")
    if explicit:
        return _verified(Path(explicit))
    cache = cache or cache_dir()
    for candidate in (REPO / "bench" / "wheels" / SDIST_NAME, cache / SDIST_NAME):
        if candidate.is_file():
            return _verified(candidate)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"pyshmem=={PYSHMEM_VERSION} --hash=sha256:{SDIST_SHA256}\n")
        cmd = (pip or [sys.executable, "-m", "pip"]) + [
            "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
            "-r", str(req), "-d", tmp, "--retries", "1", "--timeout", "15",
            "--disable-pip-version-check", "--no-input",
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"{SDIST_NAME}: pip download did not finish in {timeout:.0f} s "
                              "(offline?)") from None
        text = out.stdout + out.stderr
        if "DO NOT MATCH THE HASHES" in text:
            raise ValueError(f"{SDIST_NAME} from the package index does not match the pinned "
                             f"sha256 {SDIST_SHA256}:\n{text[-2000:]}")
        got = Path(tmp) / SDIST_NAME
        if out.returncode != 0 or not got.is_file():
            tail = "\n".join(text.strip().splitlines()[-3:])
            raise Unavailable(
                f"{SDIST_NAME} is not cached and could not be downloaded (offline?); put a "
                f"copy in {cache} or bench/wheels/, or name it in TORCH_SHMEM_PYSHMEM_SDIST. "
                f"pip said: {tail}"
            )
        _verified(got)
        os.replace(got, cache / SDIST_NAME)
    return cache / SDIST_NAME


def write_shim(src: Path) -> Path:
    """Write the ``pyshmem`` shim package under ``src``; returns its directory."""
    pkg = src / "pyshmem"
    pkg.mkdir(parents=True, exist_ok=True)
    for fname, text in SHIM_FILES.items():
        (pkg / fname).write_text(text)
    return pkg


def child_env(src: Path, extra: list[Path] = ()) -> dict[str, str]:
    """Environment for the run: the shim first on PYTHONPATH, then torch_shmem's root."""
    spec = importlib.util.find_spec("torch_shmem")
    if spec is None or spec.origin is None:
        raise RuntimeError("torch_shmem is not importable; build it first")
    root = Path(spec.origin).resolve().parent.parent
    env = dict(os.environ)
    paths = [str(src), *map(str, extra), str(root)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


_UNSHARE = ["unshare", "-m", "--propagation", "private", "sh", "-c"]


def private_shm_prefix() -> list[str] | None:
    """Command prefix running a command with a private, empty /dev/shm, or None."""
    if os.environ.get("TORCH_SHMEM_COMPAT_ISOLATE", "1") == "0":
        return None
    try:
        probe = subprocess.run(_UNSHARE + ["mount -t tmpfs tmpfs /dev/shm"], capture_output=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        return None
    return _UNSHARE + ['mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


@dataclasses.dataclass
class Result:
    part: str
    status: str  # "passed", "failed" or "unavailable"
    message: str = ""
    isolated: bool = False
    tests: dict = dataclasses.field(default_factory=dict)  # nodeid -> {"outcome", "reason"}
    output: str = ""
    verbose: bool = False  # summary() lists the excluded tests too

    def of(self, outcome: str) -> list[str]:
        return sorted(n for n, t in self.tests.items() if t["outcome"] == outcome)

    @property
    def total(self) -> int:
        return len(self.tests)

    def summary(self) -> str:
        if self.status == "unavailable":
            return f"pyshmem {PYSHMEM_VERSION} {self.part.upper()} suite: skipped: {self.message}"
        counts = {k: len(self.of(k)) for k in ("passed", "failed", "error", "excluded", "skipped")}
        internal = sum(self.tests[n]["reason"].startswith(INTERNALS) for n in self.of("excluded"))
        lines = [
            f"pyshmem {PYSHMEM_VERSION} {self.part.upper()} suite ({PARTS[self.part]}) against "
            f"torch_shmem, {'private' if self.isolated else 'shared'} /dev/shm: "
            f"{counts['passed']} passed, {counts['excluded']} excluded ({internal} for "
            f"pyshmem internals, {counts['excluded'] - internal} other), "
            f"{counts['skipped']} skipped by pyshmem's own conditions, "
            f"{counts['failed']} failed, {counts['error']} errors; {self.total} in all"
        ]
        kinds = ("failed", "error") + (("excluded",) if self.verbose else ())
        for kind in kinds:
            for nodeid in self.of(kind):
                lines.append(f"  {kind.upper()} {nodeid}: {self.tests[nodeid].get('reason', '')}")
        reasons = collections.Counter(self.tests[n]["reason"] for n in self.of("skipped"))
        for reason, n in sorted(reasons.items()):
            lines.append(f"  SKIPPED ({n}): {reason}")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)


def run(part: str = "cpu", *, timeout: float = 600.0, keep: bool = False, echo: bool = False,
        sdist: Path | None = None) -> Result:
    """Run one part of pyshmem's suite against torch_shmem; see the module docstring."""
    test_file = PARTS[part]
    try:
        sdist = sdist or fetch_sdist()
    except Unavailable as exc:
        return Result(part, "unavailable", str(exc))
    work = Path(tempfile.mkdtemp(prefix="pyshmem-compat-"))
    try:
        tests = work / "tests"
        tests.mkdir()
        with tarfile.open(sdist) as tar:
            prefix = f"pyshmem-{PYSHMEM_VERSION}/tests/"
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if member.isfile() and rel.endswith(".py") and "/" not in rel:
                    (tests / rel).write_bytes(tar.extractfile(member).read())
        if not (tests / test_file).is_file():
            raise ValueError(f"{sdist}: no tests/{test_file}")
        shim = write_shim(work / "src")
        shutil.copy(PLUGIN, work / PLUGIN.name)
        prefix_cmd = private_shm_prefix()
        excluded = {f: dict(t) for f, t in EXCLUDED.items()}
        if prefix_cmd is None:
            for f, t in CONDITIONAL.items():
                excluded.setdefault(f, {}).update(t)
        report = work / "report.json"
        (work / "config.json").write_text(json.dumps(
            {"shim": str(shim), "excluded": excluded, "report": str(report)}))
        (work / "pytest.ini").write_text("[pytest]\naddopts =\n")
        env = child_env(work / "src", [work])
        env["TORCH_SHMEM_COMPAT_CONFIG"] = str(work / "config.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
               "-c", str(work / "pytest.ini"), "--rootdir", str(work),
               "-p", PLUGIN.stem, str(tests / test_file)]
        if importlib.util.find_spec("pytest_timeout") is not None:
            # one hung test fails alone, well within the whole run's limit
            cmd[4:4] = ["--timeout", f"{min(120.0, max(10.0, timeout / 3)):.0f}"]
        proc = subprocess.Popen((prefix_cmd or []) + cmd, cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        # pytest's output is echoed as it comes (with -v, one line per test), so a run
        # stopped from outside still shows how far it got, and kept for the summary.
        lines: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
            return Result(part, "failed", f"timed out after {timeout:.0f} s",
                          prefix_cmd is not None, output="".join(lines)[-6000:])
        reader.join(5)
        output = "".join(lines)
        if not report.is_file():
            return Result(part, "failed", f"pytest exited {proc.returncode} without a report",
                          prefix_cmd is not None, output=output[-6000:])
        data = json.loads(report.read_text())
        result = Result(part, "passed", isolated=prefix_cmd is not None, tests=data["tests"],
                        output=output[-6000:])
        if prefix_cmd is None:
            why = ("TORCH_SHMEM_COMPAT_ISOLATE=0" if os.environ.get("TORCH_SHMEM_COMPAT_ISOLATE")
                   == "0" else "unshare/mount not permitted here")
            result.message = (f"no private /dev/shm ({why}): the tests that call purge() "
                              "were excluded")
        if result.of("failed") or result.of("error") or data["exitstatus"] != 0:
            result.status = "failed"
        return result
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pyshmem_suite",
                                     description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu", dest="part", action="store_const", const="cpu",
                       help="run pyshmem's tests/test_cpu_api.py (default)")
    group.add_argument("--gpu", dest="part", action="store_const", const="gpu",
                       help="run pyshmem's tests/test_gpu_api.py (skips without CUDA)")
    group.add_argument("--fetch-only", action="store_true",
                       help="obtain and verify the sdist, print its path")
    parser.add_argument("--dest", type=Path,
                        help="with --fetch-only: also copy the sdist into this directory")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="limit for the whole pytest run, seconds (600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also list the excluded tests with their reasons")
    parser.add_argument("--live", action="store_true",
                        help="echo pytest's output while it runs (a run stopped from outside "
                             "still shows how far it got)")
    args = parser.parse_args(argv)
    if args.fetch_only:
        try:
            path = fetch_sdist()
        except Unavailable as exc:
            print(f"unavailable: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if args.dest is not None:
            args.dest.mkdir(parents=True, exist_ok=True)
            if not (args.dest / SDIST_NAME).exists() or not os.path.samefile(
                    path, args.dest / SDIST_NAME):
                shutil.copyfile(path, args.dest / SDIST_NAME)
            path = args.dest / SDIST_NAME
        print(path)
        return 0
    result = run(args.part or "cpu", timeout=args.timeout, keep=args.keep, echo=args.live)
    result.verbose = args.verbose
    if result.status == "failed" and not args.live:
        print(result.output)
    print(result.summary())
    return {"passed": 0, "failed": 1, "unavailable": EXIT_UNAVAILABLE}[result.status]


if __name__ == "__main__":
    sys.exit(main())
