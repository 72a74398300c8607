"""Several processes joined by `jax.distributed.initialize`, as a multi-host job runs:
`benchmarks/multiprocess.py` starts them on localhost (CPU devices, Gloo collectives),
and its process 0 compares what the job computed with one device's result.

The workers are separate processes: they set their own device count and run without
this session's compilation cache."""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "multiprocess.py"
RTOL = 1e-5
TIMEOUT = 240


def _load_launcher():
    spec = importlib.util.spec_from_file_location("eqx_vae_multiprocess", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


def _assert_gone(pids) -> None:
    """No process is left of any worker's process group."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "processes, devices_per_process, axis_types, operations",
    [
        pytest.param(2, 2, "explicit", launcher.OPERATIONS, id="2x2-explicit"),
        pytest.param(
            4, 1, "auto", ("sharded_decode", "batch_encode", "batch_decode"), id="4x1-auto"
        ),
    ],
)
def test_processes_equal_one_device(processes, devices_per_process, axis_types, operations):
    report = launcher.launch(
        processes,
        devices_per_process,
        preset="tiny",
        axis_types=axis_types,
        batch=4,
        image_size=(32, 16),
        operations=operations,
        repeats=1,
        timeout=TIMEOUT,
    )
    devices = processes * devices_per_process
    assert (report["processes"], report["devices"]) == (processes, devices)
    assert tuple(report["operations"]) == operations
    for name, run in report["operations"].items():
        assert run["devices_used"] == devices, name
        assert run["max_rel_error"] <= RTOL, (name, run["max_rel_error"])


def test_timeout_ends_every_worker():
    start = time.monotonic()
    with pytest.raises(launcher.WorkerError, match="timed out after 2 s") as info:
        launcher.launch(2, preset="tiny", image_size=(32, 16), timeout=2)
    assert time.monotonic() - start < 30
    assert len(info.value.pids) == 2
    _assert_gone(info.value.pids)


def test_a_failing_worker_reports_its_error_and_ends_the_others():
    # The tiny model's latent of 34 / 2 = 17 rows cannot be split over 2 devices.
    with pytest.raises(launcher.WorkerError, match="exited with status 1") as info:
        launcher.launch(
            2,
            preset="tiny",
            image_size=(34, 16),
            operations=("sharded_decode",),
            timeout=TIMEOUT,
        )
    assert "`--image-size=34x16` cannot be split over 2 devices" in str(info.value)
    _assert_gone(info.value.pids)


def _children(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_the_command_ends_every_worker():
    command = [sys.executable, str(SCRIPT), "--processes=2", "--preset=tiny"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Signalled as soon as the second worker exists, which is often while the
        # launcher is still starting it.
        deadline = time.monotonic() + 30
        while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert b"Interrupted; ended the workers." in err
    _assert_gone(workers)


def test_an_interrupt_while_a_worker_starts_is_delivered_once_it_is_recorded():
    started = []
    previous = signal.signal(signal.SIGTERM, launcher._raise_on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt), launcher._signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # a handler not held back would have raised by now
            started.append("worker")
        assert started == ["worker"]
        assert signal.getsignal(signal.SIGTERM) is launcher._raise_on_sigterm
        with launcher._signals_held():
            started.append("another")
        assert started == ["worker", "another"]
        assert signal.getsignal(signal.SIGTERM) is launcher._raise_on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_end_themselves_when_the_command_is_killed():
    command = [sys.executable, str(SCRIPT), "--processes=2", "--preset=tiny"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2
        proc.kill()  # no chance to end the workers: they notice and end themselves
        proc.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers))
    finally:
        for pid in workers:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
