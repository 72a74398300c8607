import dataclasses
import os
import pathlib
import queue
import threading
from collections.abc import Generator

import numpy as np

from .._images import IMAGE_SUFFIXES, read_image, resize


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where in the sample stream a batch begins: the epoch and the index within the
    epoch's shuffled order. Saved with checkpoints, so that a resumed run sees the
    same batches as an uninterrupted one."""

    epoch: int = 0
    index: int = 0


class Samples:
    """A deterministic, endless stream of samples in `[-1, 1]`, channels first, grouped
    in batches: what [`eqx_vae.train.fit`][] trains on.

    A subclass gives `epoch_size` (samples per epoch) and `sample(epoch, index)`, a
    function of its arguments and the stream's seed alone. A batch is then a function
    of its `DataPosition`, so a resumed run sees the batches an uninterrupted one
    would.
    """

    batch_size: int
    epoch_size: int
    prefetch: int = 2

    def sample(self, epoch: int, index: int) -> np.ndarray:
        """The sample at position `(epoch, index)` of the stream, `(C, H, W)`."""
        raise NotImplementedError

    def batch(self, position: DataPosition) -> tuple[np.ndarray, DataPosition]:
        """The batch starting at `position`, and the position after it."""
        epoch, index = position.epoch, position.index
        samples = []
        for _ in range(self.batch_size):
            if index >= self.epoch_size:
                epoch, index = epoch + 1, 0
            samples.append(self.sample(epoch, index))
            index += 1
        return np.stack(samples), DataPosition(epoch, index)

    def batches(
        self, start: DataPosition = DataPosition()
    ) -> Generator[tuple[np.ndarray, DataPosition], None, None]:
        """Batches from `start` on, each with the position after it, decoded in a
        background thread."""
        results: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def produce() -> None:
            position = start
            try:
                while not stop.is_set():
                    batch, position = self.batch(position)
                    while not stop.is_set():
                        try:
                            results.put((batch, position), timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # handed to the consumer
                results.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


class ImageFolder(Samples):
    """The images under a folder (recursively), as an endless, deterministic stream of
    batches of random crops and horizontal flips.

    Optional augmentations:

    - `scale=(low, high)`: each crop is taken at a random scale in that range
        (log-uniform): a region of `crop_size / scale` pixels, resized to `crop_size`
        with antialiasing. Scales below 1 show more of each image per crop.
    - `permute_channels`: each crop's RGB channels are put in a random order, so that
        colours absent from a small dataset (blue skies from red fabric) are seen.
    - `contrast=(low, high)`, within `[0, 1]`: each crop is blended towards its own mean
        colour by a factor drawn uniformly from the range (1 leaves it as it is, 0
        makes it flat), so that dim, low-contrast photographs are seen with the
        textures of real ones. `None` (the default) draws nothing.
    - `colour_shift`: each channel of each crop is offset by an amount drawn uniformly
        from `[-colour_shift, colour_shift]` (then clipped to `[-1, 1]`), so that an
        image's overall colour is not learnt from its content (a small dataset's
        stained tissue is always pink). 0 (the default) draws nothing.

    The order of each epoch is a permutation drawn from `(seed, epoch)`; each
    sample's crop and augmentations are drawn from `(seed, epoch, index)`. A batch is
    therefore a function of the seed and its `DataPosition` alone, whatever happened
    before. Images are decoded by a background thread, `prefetch` batches ahead.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        crop_size: int,
        batch_size: int,
        seed: int = 0,
        flip: bool = True,
        scale: tuple[float, float] = (1.0, 1.0),
        permute_channels: bool = False,
        contrast: tuple[float, float] | None = None,
        colour_shift: float = 0.0,
        prefetch: int = 2,
    ):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"The data folder {self.root} does not exist.")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise ValueError(f"{self.root} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        if crop_size < 1 or batch_size < 1:
            raise ValueError(
                f"Need positive crop and batch sizes, got {crop_size} and {batch_size}."
            )
        low, high = scale
        if not 0 < low <= high:
            raise ValueError(f"Need a scale range 0 < low <= high, got {scale}.")
        if contrast is not None and not 0 <= contrast[0] <= contrast[1] <= 1:
            raise ValueError(f"Need a contrast range 0 <= low <= high <= 1, got {contrast}.")
        if not 0 <= colour_shift <= 2:
            raise ValueError(f"Need a colour shift in [0, 2], got {colour_shift}.")
        self.colour_shift = float(colour_shift)
        self.crop_size = crop_size
        self.contrast = None if contrast is None else (float(contrast[0]), float(contrast[1]))
        self.scale = (float(low), float(high))
        self.permute_channels = permute_channels
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.prefetch = prefetch
        self._cache: dict[pathlib.Path, np.ndarray] = {}
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def epoch_size(self) -> int:  # pyright: ignore[reportIncompatibleVariableOverride]
        return len(self.files)

    def sample(self, epoch: int, index: int) -> np.ndarray:
        """The crop at position `(epoch, index)` of the stream."""
        image = self._image(self.files[self._order(epoch)[index]])
        rng = np.random.default_rng([self.seed, epoch, index])
        _, h, w = image.shape
        low, high = self.scale
        scale = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if low < high else low
        # The region a crop is cut from: at most the image's shorter side.
        region = min(max(1, round(self.crop_size / scale)), h, w)
        top = int(rng.integers(0, h - region + 1))
        left = int(rng.integers(0, w - region + 1))
        crop = image[:, top : top + region, left : left + region]
        if region != self.crop_size:
            crop = resize(crop, self.crop_size)
        if self.flip and rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        if self.permute_channels:
            crop = crop[rng.permutation(crop.shape[0])]
        if self.contrast is not None:
            factor = rng.uniform(*self.contrast)
            mean = crop.mean(axis=(1, 2), keepdims=True)
            crop = (mean + factor * (crop - mean)).astype(np.float32)
        if self.colour_shift > 0:
            shift = rng.uniform(-self.colour_shift, self.colour_shift, (crop.shape[0], 1, 1))
            crop = np.clip(crop + shift, -1.0, 1.0).astype(np.float32)
        return np.ascontiguousarray(crop)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _image(self, path: pathlib.Path) -> np.ndarray:
        image = self._cache.get(path)
        if image is None:
            image = read_image(path)
            _, h, w = image.shape
            if min(h, w) < self.crop_size:
                image = _upscale(image, self.crop_size / min(h, w))
            if len(self._cache) < 256:  # small datasets stay decoded in memory
                self._cache[path] = image
        return image


def _upscale(image: np.ndarray, factor: float) -> np.ndarray:
    _, h, w = image.shape
    return resize(image, (max(1, round(h * factor + 0.5)), max(1, round(w * factor + 0.5))))


class Mixture(Samples):
    """Samples drawn from several streams: each sample comes from one of `sources`,
    chosen at random with probabilities in proportion to `weights`.

    The `n`-th sample of the mixture (`n = epoch * epoch_size + index`), when it comes
    from a source, is that source's `n`-th sample, so every source keeps its own
    shuffling and augmentations. The sources' own batch sizes play no part; their
    samples must all have one shape.

    **Arguments:**

    - `sources`: [`eqx_vae.train.ImageFolder`][], [`eqx_vae.train.DeadLeaves`][] or
        any other [`eqx_vae.train.Samples`][].
    - `weights`: one non-negative weight per source; equal weights by default.
    - `batch_size`: samples per batch.
    - `seed`: the seed of the choice of source.
    - `epoch_size`: samples per epoch of the mixture (it only numbers positions).
    """

    def __init__(
        self,
        sources: "list[Samples] | tuple[Samples, ...]",
        weights: "list[float] | tuple[float, ...] | None" = None,
        *,
        batch_size: int,
        seed: int = 0,
        epoch_size: int = 1024,
        prefetch: int = 2,
    ):
        if not sources:
            raise ValueError("A mixture needs at least one source.")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"Got {len(sources)} sources and {len(weights)} weights.")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"Need non-negative weights with a positive sum, got {weights}.")
        sizes: set[int] = {s.crop_size for s in sources if hasattr(s, "crop_size")}  # pyright: ignore[reportAttributeAccessIssue]
        if len(sizes) > 1:
            raise ValueError(f"The sources give crops of different sizes: {sorted(sizes)}.")
        if batch_size < 1 or epoch_size < 1:
            raise ValueError(
                f"Need positive batch and epoch sizes, got {batch_size} and {epoch_size}."
            )
        self.sources = tuple(sources)
        self.weights = np.asarray(weights, np.float64) / sum(weights)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch_size = epoch_size
        self.prefetch = prefetch
        if sizes:
            self.crop_size = sizes.pop()

    def sample(self, epoch: int, index: int) -> np.ndarray:
        n = epoch * self.epoch_size + index
        rng = np.random.default_rng([self.seed, epoch, index])
        source = self.sources[int(rng.choice(len(self.sources), p=self.weights))]
        return source.sample(*divmod(n, source.epoch_size))


class Alternating(Samples):
    """Batches from several streams in turn: batch `n` is batch `n // k` of stream
    `n % k` (`k` streams), so each stream keeps its own crop and batch size. Training
    on crops of several sizes this way shows GroupNorm the statistics of small and
    large images alike; each shape is compiled once.

    **Arguments:**

    - `sources`: the streams ([`eqx_vae.train.ImageFolder`][],
        [`eqx_vae.train.Mixture`][], ...), each with its own `crop_size` and
        `batch_size`.
    - `epoch_size`: batches per epoch (it only numbers positions).

    `batch_size` is the first stream's; batches of the others may differ in size and
    shape. The recipe's reconstruction term sums over each image's pixels and averages
    over the batch, so a batch's loss, and its gradient, grows with its crops' area:
    under Adam the batches of the largest crops set the scale of the steps.
    `TrainConfig(loss_area=...)` weighs every pixel alike instead.
    """

    def __init__(
        self,
        sources: "list[Samples] | tuple[Samples, ...]",
        *,
        epoch_size: int = 1024,
        prefetch: int = 2,
    ):
        if not sources:
            raise ValueError("Alternating needs at least one source.")
        if epoch_size < 1:
            raise ValueError(f"Need a positive epoch size, got {epoch_size}.")
        self.sources = tuple(sources)
        self.batch_size = self.sources[0].batch_size
        self.epoch_size = epoch_size
        self.prefetch = prefetch

    def sample(self, epoch: int, index: int) -> np.ndarray:
        raise TypeError("An Alternating stream gives whole batches (`batch`), not samples.")

    def batch(self, position: DataPosition) -> tuple[np.ndarray, DataPosition]:
        n = position.epoch * self.epoch_size + position.index
        source = self.sources[n % len(self.sources)]
        start = (n // len(self.sources)) * source.batch_size
        batch, _ = source.batch(DataPosition(*divmod(start, source.epoch_size)))
        return batch, DataPosition(*divmod(n + 1, self.epoch_size))
