import json
import os
import pathlib
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._custom_types import KeyArray
from .._files import atomic_write
from .._images import write_image
from .._progress import Progress
from .._statistics import latent_statistics
from .._xla import compiler_options
from ._checkpoint import load_checkpoint, save_checkpoint
from ._data import DataPosition, Samples
from ._lpips import LPIPS
from ._state import TrainConfig, TrainState
from ._step import make_train_step


CHECKPOINT = "checkpoint.eqx"
METRICS = "metrics.jsonl"
STATISTICS = "latent_statistics.json"


def fit(
    state: TrainState,
    config: TrainConfig,
    data: Samples,
    optimizers: tuple[Any, Any],
    *,
    steps: int,
    out: str | os.PathLike[str],
    key: KeyArray,
    lpips: LPIPS | None = None,
    samples: np.ndarray | None = None,
    log_every: int = 10,
    sample_every: int = 250,
    checkpoint_every: int = 500,
    mesh: Mesh | None = None,
    resume: bool = True,
    progress: bool = True,
    statistics_batches: int = 0,
) -> TrainState:
    """Trains until `state.step == steps`, writing to `out`:

    - `checkpoint.eqx`: the whole training state and data position, every
        `checkpoint_every` steps and at the end (atomically). With `resume`, an existing
        one is continued: batches and sampling keys depend only on the step and the data
        position, so a resumed run computes the same losses as an uninterrupted one.
    - `metrics.jsonl`: the mean of every metric over each `log_every` steps.
    - `samples/step_<n>.png`: `samples` (images in `[-1, 1]`) above their
        reconstructions (by the EMA weights when there are some), every `sample_every`
        steps.
    - `losses.png`: the loss curves, at every checkpoint.
    - `latent_statistics.json`, with `statistics_batches`: the statistics of the final
        model's latents (the EMA weights when there are some) over that many batches of
        the training data, and the latent scaling they give under each convention (see
        [`eqx_vae.latent_statistics`][] and [`eqx_vae.apply_latent_statistics`][]).

    **Arguments:**

    - `state`: from `init_state`.
    - `config`, `optimizers`, `lpips`: as given to `init_state` / `make_train_step`.
    - `data`: the training images: an [`eqx_vae.train.ImageFolder`][], a
        [`eqx_vae.train.DeadLeaves`][], a [`eqx_vae.train.Mixture`][] of them, or any
        [`eqx_vae.train.Samples`][].
    - `steps`: the step to stop at.
    - `key`: the run's PRNG key; step `n` uses `jax.random.fold_in(key, n)`.
    - `mesh`: a mesh with a `"batch"` axis for data-parallel training (batch sharded,
        state replicated); by default one device.
    - `progress`: show a progress bar on standard error.
    - `statistics_batches`: how many batches of `data` to measure the latent
        statistics on at the end (none by default).

    **Returns:**

    The final state.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state, position = _start(state, out, resume)
    step_fn = make_train_step(config, optimizers, lpips)

    def step_on(inputs, state):
        return step_fn(state, *inputs)

    # Only the state is donated: the batch and key cannot be reused as outputs, so
    # donating them would only raise JAX's "donated buffers were not usable" warning.
    options = compiler_options()
    compiled = eqx.filter_jit(step_on, donate="all-except-first", compiler_options=options)  # pyright: ignore[reportCallIssue]
    batch_sharding = None
    if mesh is not None:
        batch_sharding = NamedSharding(mesh, P("batch"))
        state = jax.device_put(state, NamedSharding(mesh, P()))

    start = int(state.step)
    bar = Progress(steps - start, "training") if progress else None
    log = _MeanLog(out / METRICS, log_every)
    stream = data.batches(position)
    try:
        for step in range(start, steps):
            images, position = next(stream)
            batch = (
                jnp.asarray(images)
                if batch_sharding is None
                else jax.device_put(images, batch_sharding)
            )
            state, metrics = compiled((batch, jax.random.fold_in(key, step)), state)
            values = {k: float(v) for k, v in metrics.items()}
            done = step + 1
            if bar is not None:
                bar.update(1, loss=values["loss"], rec=values["rec"], psnr=values["psnr"])
            log.add(values, done, last=done == steps)
            if samples is not None and (done % sample_every == 0 or done == steps):
                _write_samples(out / "samples" / f"step_{done:07d}.png", state, samples)
            if done % checkpoint_every == 0 or done == steps:
                save_checkpoint(out / CHECKPOINT, state, config=config, position=position)
                if (out / METRICS).exists():
                    plot_losses(out / METRICS, out / "losses.png")
    finally:
        stream.close()
    if statistics_batches > 0:
        _write_statistics(out / STATISTICS, state, data, statistics_batches)
    return state


def _write_statistics(path: pathlib.Path, state: TrainState, data: Samples, batches: int) -> None:
    """The latent statistics of the final model over `batches` batches of `data`, from
    an epoch training does not reach (so the same crops whenever it is run)."""
    model = state.ema if state.ema is not None else state.vae
    position = DataPosition(epoch=10_000)
    images = []
    for _ in range(batches):
        batch, position = data.batch(position)
        images.append(batch)
    stats = latent_statistics(model, images)
    record = stats.to_dict()
    record["conventions"] = {c: stats.config_fields(c) for c in stats.conventions()}
    with atomic_write(path) as f:
        f.write(json.dumps(record, indent=2).encode())


def _start(state: TrainState, out: pathlib.Path, resume: bool) -> tuple[TrainState, DataPosition]:
    """The state and data position to start from: the checkpoint in `out` (dropping the
    metrics logged after it) when resuming, else a copy of `state` (the step donates
    its input's buffers; the caller's arrays stay usable)."""
    if resume and (out / CHECKPOINT).exists():
        state, position, _ = load_checkpoint(out / CHECKPOINT, state)
        _truncate_metrics(out / METRICS, int(state.step))
        return state, position
    state = jax.tree_util.tree_map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, state)
    return state, DataPosition()


class _MeanLog:
    """The mean of every metric over each `every` steps (and the last), appended to a
    JSON-lines file with the step and the seconds since the start."""

    def __init__(self, path: pathlib.Path, every: int):
        self.path, self.every = path, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.begun = time.perf_counter()

    def add(self, values: dict[str, float], step: int, *, last: bool) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if self.count == self.every or last:
            record = {"step": step, "seconds": time.perf_counter() - self.begun}
            record.update({k: v / self.count for k, v in self.sums.items()})
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.sums, self.count = {}, 0


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drops the records after `step` (written after the checkpoint being resumed)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


@eqx.filter_jit
def _reconstruct_batch(model: Any, images: Any) -> Any:
    return jax.vmap(model)(images)


def _write_samples(path: pathlib.Path, state: TrainState, samples: np.ndarray) -> None:
    model = state.ema if state.ema is not None else state.vae
    recon = _reconstruct_batch(model, jnp.asarray(samples))
    top = np.concatenate(list(samples), axis=2)
    bottom = np.concatenate(list(np.asarray(recon)), axis=2)
    write_image(path, np.concatenate([top, bottom], axis=1))


def plot_losses(
    metrics: str | os.PathLike[str],
    out: str | os.PathLike[str],
    keys: tuple[str, ...] = ("loss", "rec", "psnr"),
) -> None:
    """Draws the curves of `keys` from a `metrics.jsonl` against the step, one panel
    each, to a PNG."""
    from PIL import Image, ImageDraw

    records = [json.loads(line) for line in pathlib.Path(metrics).read_text().splitlines()]
    keys = tuple(k for k in keys if records and k in records[0])
    width, height, margin = 480, 200, 40
    image = Image.new("RGB", (width, height * max(1, len(keys))), "white")
    draw = ImageDraw.Draw(image)
    steps = [float(r["step"]) for r in records]
    for panel, key in enumerate(keys):
        values = [float(r[key]) for r in records]
        top = panel * height
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        x0, x1 = min(steps), max(max(steps), min(steps) + 1.0)

        def point(
            s: float,
            v: float,
            top: int = top,
            lo: float = lo,
            span: float = span,
            x0: float = x0,
            x1: float = x1,
        ) -> tuple[float, float]:
            x = margin + (width - 2 * margin) * (s - x0) / (x1 - x0)
            y = top + height - margin + (2 * margin - height) * (v - lo) / span
            return x, y

        draw.rectangle(
            [margin, top + margin, width - margin, top + height - margin], outline="gray"
        )
        if len(values) > 1:
            draw.line(
                [point(s, v) for s, v in zip(steps, values, strict=True)], fill="navy", width=2
            )
        draw.text(
            (margin, top + 8), f"{key}: {values[-1]:.4g} at step {steps[-1]:.0f}", fill="black"
        )
        draw.text((4, top + margin), f"{hi:.3g}", fill="gray")
        draw.text((4, top + height - margin - 10), f"{lo:.3g}", fill="gray")
    image.save(out)
