"""Several processes, one model: a multi-host job on one machine.

    python benchmarks/multiprocess.py [--processes 2] [--devices-per-process 1]
        [--preset small] [--image-size 128x64] [--batch 8] [--axis-types explicit]
        [--repeats 3] [--timeout 240] [--json out.json]

Starts `--processes` worker processes on localhost, as a multi-host TPU or GPU job runs
one process per host: each calls `jax.distributed.initialize` (a coordinator on a free
local port, CPU collectives over Gloo), owns `--devices-per-process` CPU devices, builds
the same model from the same key and a mesh over every process's devices, and creates
only its own share of the inputs. Then, on that mesh:

- `sharded_decode` and `sharded_encode` of one image, its height split over all devices;
- a batch of such images split over all devices, encoded and decoded by
  `eqx.filter_jit(jax.vmap(...))`.

Process 0 gathers the results (`process_allgather`), computes the same on its own
(one image at a time on one device, without a mesh) and reports the largest relative
difference, `max|a - b| / max|b|`, with the compile time and the time per call after
compiling (the slowest process's; median of `--repeats`). The launcher ends every
worker's process group on failure, timeout or Ctrl-C, and exits nonzero with their
standard error.

`launch(...)` runs the same from Python and returns the report.
"""

import argparse
import contextlib
import functools
import inspect
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "small", "sd15")
OPERATIONS = ("sharded_decode", "sharded_encode", "batch_encode", "batch_decode")


class WorkerError(RuntimeError):
    """A worker failed or the run timed out; every worker has been ended.

    `pids` are the process ids of the workers, all ended and reaped."""

    def __init__(self, message: str, pids: Sequence[int]):
        super().__init__(message)
        self.pids = tuple(pids)


# The launcher.


def launch(
    processes: int,
    devices_per_process: int = 1,
    *,
    preset: str = "small",
    axis_types: str = "explicit",
    batch: int = 8,
    image_size: tuple[int, int] = (128, 64),
    operations: Sequence[str] = OPERATIONS,
    repeats: int = 3,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs the comparison in `processes` worker processes on localhost and returns
    process 0's report (see the module's docstring).

    **Arguments:**

    - `processes`, `devices_per_process`: the job's shape; the mesh has
        `processes * devices_per_process` CPU devices.
    - `preset`: `"tiny"` (two levels of 16 and 32 channels, for tests), `"small"`
        (three levels of 32 channels) or `"sd15"` (the SD 1.x architecture); random
        weights.
    - `axis_types`: `"explicit"` (what `jax.make_mesh` gives by default) or `"auto"`.
    - `batch`: the number of images in the batch, a multiple of the number of devices.
    - `image_size`: `(height, width)` in pixels of the one image split over the
        devices, and of each of the batch's images; the height a multiple of the
        number of devices times the model's spatial factor.
    - `operations`: which of `OPERATIONS` to run, in that order.
    - `repeats`: calls timed after compiling, per operation.
    - `timeout`: seconds for the whole run; each worker also ends itself 10 s later.
    - `env`: extra environment variables for the workers.

    **Returns:**

    The report as a dictionary.

    **Raises:**

    `WorkerError` when a worker exits with an error or the run takes longer than
    `timeout`; all workers have been ended by then.
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"Got `processes={processes}`, `devices_per_process={devices_per_process}`; "
            "both must be at least 1."
        )
    for name, value, known in (
        ("preset", preset, PRESETS),
        ("axis_types", axis_types, ("explicit", "auto")),
        *(("operations", op, OPERATIONS) for op in operations),
    ):
        if value not in known:
            raise ValueError(f"`{name}`: got {value!r}; expected one of {', '.join(known)}.")
    coordinator = f"127.0.0.1:{free_port()}"
    options = [
        f"--processes={processes}",
        f"--devices-per-process={devices_per_process}",
        f"--preset={preset}",
        f"--axis-types={axis_types}",
        f"--batch={batch}",
        f"--image-size={image_size[0]}x{image_size[1]}",
        f"--operations={','.join(operations)}",
        f"--repeats={repeats}",
        # The launcher ends the workers at `timeout`; a worker ends itself a little
        # later, should the launcher be gone without ending it.
        f"--timeout={timeout + 10}",
    ]
    worker_env = {**os.environ, **(env or {})}
    # The workers import this checkout's eqx_vae, and run on CPU devices only.
    worker_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), worker_env.get("PYTHONPATH", "")) if p
    )
    worker_env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="eqx_vae_multiprocess_") as tmp:
        result = pathlib.Path(tmp) / "result.json"
        logs, procs = [], []
        try:
            for i in range(processes):
                out = open(pathlib.Path(tmp) / f"{i}.out", "w+b")  # noqa: SIM115
                err = open(pathlib.Path(tmp) / f"{i}.err", "w+b")  # noqa: SIM115
                logs.append((out, err))
                command = [sys.executable, __file__, *options]
                command += [f"--worker={i}", f"--coordinator={coordinator}", f"--result={result}"]
                command += [f"--launcher={os.getpid()}"]
                # Each worker leads a process group of its own, so that it and
                # anything it starts can be ended together. An interrupt while the
                # worker starts waits until it is on the list that `end_all` ends.
                with _signals_held():
                    procs.append(
                        subprocess.Popen(
                            command, stdout=out, stderr=err, env=worker_env, start_new_session=True
                        )
                    )
            _wait(procs, logs, timeout)
            if not result.exists():
                raise WorkerError(
                    "The workers exited without a report.\n" + _outputs(logs), _pids(procs)
                )
            return json.loads(result.read_text())
        finally:
            end_all(procs)
            for out, err in logs:
                out.close()
                err.close()


@contextlib.contextmanager
def _signals_held(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Holds back `signums` for the duration of the block and delivers them, to the
    handlers that were there before it, when it ends.

    `subprocess.Popen` can be interrupted after the child process exists but before
    it returns the `Popen`, and then nothing can end that child. Only the main thread
    handles signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler set from C, which this cannot restore
            previous[signum] = handler
            signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the coordinator to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen], logs: list, timeout: float) -> None:
    """Waits until every worker has exited; raises `WorkerError` (after ending the
    others) when one fails or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            end_all(procs)
            raise WorkerError(
                f"Worker {failed[0]} exited with status {codes[failed[0]]}; ended the "
                "others.\n" + _outputs(logs),
                _pids(procs),
            )
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            end_all(procs)
            raise WorkerError(
                f"The workers timed out after {timeout:g} s; ended them all.\n" + _outputs(logs),
                _pids(procs),
            )
        time.sleep(0.1)


def end_all(procs: Sequence[subprocess.Popen], grace: float = 3.0) -> None:
    """Ends the process group of every worker still running: SIGTERM, then SIGKILL
    after `grace` seconds; reaps them all."""
    running = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = [p for p in running if p.poll() is None]
        if not running:
            break
    for p in procs:
        p.wait()


def _pids(procs: Sequence[subprocess.Popen]) -> list[int]:
    return [p.pid for p in procs]


def _outputs(logs: list, chars: int = 4000) -> str:
    parts = []
    for i, (out, err) in enumerate(logs):
        for name, f in (("stdout", out), ("stderr", err)):
            f.flush()
            f.seek(0)
            text = f.read().decode(errors="replace").strip()
            if text:
                parts.append(f"--- worker {i} {name} (last {chars} characters) ---\n")
                parts.append(text[-chars:] + "\n")
    return "".join(parts) or "(the workers wrote nothing)"


# The workers.


def worker(args: argparse.Namespace) -> None:
    """One process of the job: joins it, runs every operation on the global mesh, and
    in process 0 compares with the single-device results and writes the report."""
    _watchdog(args.timeout, args.launcher)
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Measure compiling: no compilation cache shared between the workers or runs.
    jax.config.update("jax_enable_compilation_cache", False)
    timeouts: dict[str, Any] = {
        "initialization_timeout": int(min(args.timeout, 120)),
        "heartbeat_timeout_seconds": 30,
        # Process 0 computes the reference after the others are done with the job.
        "shutdown_timeout_seconds": int(args.timeout),
    }
    # Older JAX versions take fewer of these.
    known = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.processes,
        process_id=args.worker,
        **{name: value for name, value in timeouts.items() if name in known},
    )
    import eqx_vae

    model = eqx_vae.AutoencoderKL(_config(args.preset), key=jax.random.key(0))
    inputs = _inputs(model, args)
    runs = {name: _run_global(name, model, inputs[name], args) for name in args.operations}
    if jax.process_index() == 0:
        report = _report(args, model, runs, inputs)
        tmp = pathlib.Path(args.result + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.result)
    jax.distributed.shutdown()


def _watchdog(timeout: float, launcher: int) -> None:
    """Ends this worker after `timeout` seconds, or as soon as its parent is no longer
    the process `launcher`, whatever it is blocked in (a collective waiting for a dead
    peer, say)."""
    start = time.monotonic()

    def watch() -> None:
        while True:
            if os.getppid() != launcher:
                print("the launcher is gone", file=sys.stderr, flush=True)
                os._exit(3)
            if time.monotonic() - start > timeout:
                print(f"worker timed out after {timeout:g} s", file=sys.stderr, flush=True)
                os._exit(124)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _config(preset: str):
    import eqx_vae

    if preset == "sd15":
        return eqx_vae.AutoencoderKLConfig.sd15()
    channels = (16, 32) if preset == "tiny" else (32, 32, 32)
    return eqx_vae.AutoencoderKLConfig(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=8,
    )


Input = tuple[str, tuple[int, ...], int]  # distribution, global shape, axis split


def _inputs(model, args: argparse.Namespace) -> dict[str, Input]:
    """Each operation's input: one image (or its latent) of `--image-size`, its height
    split over the devices, or a batch of `--batch` of them, split along the batch."""
    import jax

    height, width = args.image_size
    f = model.spatial_factor
    devices = jax.device_count()
    if height % (f * devices) or width % f:
        raise ValueError(
            f"`--image-size={height}x{width}` cannot be split over {devices} devices: the "
            f"height must be a multiple of {f * devices} (the model's spatial factor {f} "
            f"times the devices), the width of {f}."
        )
    if args.batch % devices:
        raise ValueError(
            f"`--batch={args.batch}` cannot be split over {devices} devices; use a "
            "multiple of the number of devices."
        )
    latent = (model.latent_channels, height // f, width // f)
    image = (model.in_channels, height, width)
    return {
        "sharded_decode": ("normal", latent, 1),
        "sharded_encode": ("uniform", image, 1),
        "batch_encode": ("uniform", (args.batch, *image), 0),
        "batch_decode": ("normal", (args.batch, *latent), 0),
    }


def _run_global(name: str, model, data: Input, args: argparse.Namespace) -> dict[str, Any]:
    """Runs operation `name` on a mesh over every device of every process: compiles it,
    times `--repeats` calls and gathers the result into every process."""
    import equinox as eqx
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import eqx_vae

    mesh = _mesh(args.axis_types)
    functions: dict[str, Callable] = {
        "sharded_decode": lambda m, z: eqx_vae.sharded_decode(m, z, mesh, "devices"),
        "sharded_encode": lambda m, x: _moments(eqx_vae.sharded_encode(m, x, mesh, "devices")),
        "batch_encode": lambda m, x: _moments(jax.vmap(m.encode)(x)),
        "batch_decode": lambda m, z: jax.vmap(m.decode)(z),
    }
    # Every process built the same parameters from the same key: each places its copy
    # on its own devices, together one replicated global array.
    params, static = eqx.partition(model, eqx.is_array)
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda a: _global(np.asarray(a), replicated), params)
    model = eqx.combine(params, static)
    _, shape, axis = data
    split = NamedSharding(mesh, P(*([None] * axis), "devices"))
    # Each process creates the rows its own devices hold, and only those.
    array = jax.make_array_from_callback(shape, split, functools.partial(_rows, name, data))
    compiled, compile_s = _compile(eqx.filter_jit(functions[name]), model, array)
    out, call_s = _calls(compiled, (model, array), args.repeats, barrier=True)
    # The job waits for its slowest process: report that one's times.
    times = multihost_utils.process_allgather(np.array([compile_s, call_s]))
    return {
        "result": multihost_utils.process_allgather(out, tiled=True),
        "compile_s": float(times[:, 0].max()),
        "call_s": float(times[:, 1].max()),
        "devices_used": len(jax.tree.leaves(out)[0].sharding.device_set),
    }


def _mesh(axis_types: str):
    """A one-axis mesh, `"devices"`, over every device of every process."""
    import jax
    from jax.sharding import AxisType

    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_types]
    return jax.make_mesh((jax.device_count(),), ("devices",), axis_types=(kind,))


def _global(host: np.ndarray, sharding):
    import jax

    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _moments(posterior) -> tuple:
    return posterior.mean, posterior.logvar


def _rows(name: str, data: Input, index: Any) -> np.ndarray:
    """The part `index` of operation `name`'s input: every slice along the split axis
    drawn from its own seed, so that a process creates only the rows it holds and all
    processes agree on them."""
    kind, shape, axis = data
    one = shape[:axis] + shape[axis + 1 :]
    parts = []
    for r in range(*index[axis].indices(shape[axis])):
        rng = np.random.default_rng([OPERATIONS.index(name), r])
        if kind == "normal":
            parts.append(rng.standard_normal(one, dtype=np.float32))
        else:
            parts.append(rng.uniform(-1.0, 1.0, one).astype(np.float32))
    rest = tuple(slice(None) if a == axis else s for a, s in enumerate(index))
    return np.stack(parts, axis=axis)[rest]


def _compile(fn: Any, *args: Any) -> tuple[Callable, float]:
    """`fn` (an `eqx.filter_jit` function) compiled for `args`, and the seconds it took."""
    import eqx_vae

    options = eqx_vae.compiler_options()
    start = time.perf_counter()
    # Older Equinox versions' `lower(...).compile()` takes no options (and older jaxlibs
    # know none to give).
    lowered = fn.lower(*args)
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    return compiled, time.perf_counter() - start


def _calls(fn: Callable, args: tuple, repeats: int, barrier: bool = False) -> tuple[Any, float]:
    """The result of `fn(*args)` and the median seconds of `repeats` calls; with
    `barrier`, all processes start each call together."""
    import jax
    from jax.experimental import multihost_utils

    seconds, out = [], None
    for i in range(repeats):
        if barrier:
            multihost_utils.sync_global_devices(f"call {i}")
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return out, float(np.median(seconds))


def _report(args: argparse.Namespace, model, runs: dict, inputs: dict) -> dict[str, Any]:
    """Process 0's report: each operation's timings and its relative difference from
    the same images encoded or decoded one at a time on one device, without a mesh."""
    import equinox as eqx
    import jax

    device = jax.local_devices()[0]
    params, static = eqx.partition(model, eqx.is_array)
    model = eqx.combine(jax.device_put(params, device), static)
    # One program per method, compiled for one image: the batch's images have the
    # one image's size.
    single: dict[str, Callable] = {
        "decode": lambda m, z: m.decode(z),
        "encode": lambda m, x: _moments(m.encode(x)),
    }
    compiled = {}
    for method, fn in single.items():
        if not any(name.endswith(method) for name in runs):
            continue
        _, shape, _ = inputs[f"sharded_{method}"]
        example = jax.device_put(np.zeros(shape, np.float32), device)
        compiled[method] = _compile(eqx.filter_jit(fn), model, example)
    operations = {}
    for name in runs:
        method = name.split("_")[1]
        _, shape, axis = inputs[name]
        whole = _rows(name, inputs[name], (slice(None),) * len(shape))
        items = [jax.device_put(item, device) for item in (whole[None] if axis else whole)]
        fn, compile_s = compiled[method]

        def each(fn=fn, items=items) -> list:
            return [fn(model, item) for item in items]

        outs, call_s = _calls(each, (), args.repeats)
        expected = jax.tree.map(lambda *a: np.stack(a), *outs)
        if axis:  # one image, not a batch
            expected = jax.tree.map(lambda a: a[0], expected)
        run = runs[name]
        pairs = zip(jax.tree.leaves(run["result"]), jax.tree.leaves(expected), strict=True)
        operations[name] = {
            "shape": list(shape),
            "max_rel_error": max(_relative(a, b) for a, b in pairs),
            "compile_s": run["compile_s"],
            "call_s": run["call_s"],
            "devices_used": run["devices_used"],
            "single_device_compile_s": compile_s,
            "single_device_call_s": call_s,
        }
    return {
        "processes": jax.process_count(),
        "devices_per_process": jax.local_device_count(),
        "devices": jax.device_count(),
        "preset": args.preset,
        "axis_types": args.axis_types,
        "collectives": "gloo",
        "repeats": args.repeats,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "operations": operations,
    }


def _relative(actual: Any, expected: Any) -> float:
    """`max|actual - expected| / max|expected|`, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"Shapes differ: {actual.shape} against {expected.shape}.")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


# The command line.


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH such as 128x64, got {text!r}"
        ) from None
    return height, width


def _operations(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated selection of {', '.join(OPERATIONS)}; got {text!r}"
        )
    return tuple(n for n in OPERATIONS if n in names)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sharded encode and decode across several processes on localhost."
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--axis-types", choices=("explicit", "auto"), default="explicit")
    parser.add_argument("--batch", type=int, default=8, help="images in the batch")
    parser.add_argument(
        "--image-size",
        type=_image_size,
        default=(128, 64),
        help="HEIGHTxWIDTH of the one image split over the devices",
    )
    parser.add_argument(
        "--operations",
        type=_operations,
        default=OPERATIONS,
        help=f"a comma-separated selection of {','.join(OPERATIONS)} (all by default)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for the run")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--launcher", type=int, help=argparse.SUPPRESS)
    return parser


def _table(report: dict[str, Any]) -> str:
    lines = [
        "| operation | shape | max rel. error | compile | per call | one device, per call |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["operations"].items():
        lines.append(
            f"| {name} | {r['shape']} | {r['max_rel_error']:.1e} | {r['compile_s']:.2f} s "
            f"| {r['call_s'] * 1e3:.0f} ms | {r['single_device_call_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    args = _parser().parse_args()
    if args.worker is not None:
        worker(args)
        return
    # A SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C: the workers are ended.
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        report = launch(
            args.processes,
            args.devices_per_process,
            preset=args.preset,
            axis_types=args.axis_types,
            batch=args.batch,
            image_size=args.image_size,
            operations=args.operations,
            repeats=args.repeats,
            timeout=args.timeout,
        )
    except WorkerError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted; ended the workers.", file=sys.stderr)
        sys.exit(130)
    print(
        f"{report['processes']} processes x {report['devices_per_process']} CPU devices "
        f"({report['preset']} model, {report['axis_types']} mesh axes, jax {report['jax']}, "
        f"{report['cpu_count']} cores)\n"
    )
    print(_table(report))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
