"""Compiled encoding and decoding for serving: a program per input shape, compiled ahead
of time under the backend's compiler options, with 8-bit pixels in and out on the
device; and [`eqx_vae.Codec`][], which runs images of any size through a few such
programs by padding them to a bucket shape."""

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from ._autoencoder import AutoencoderKL, posterior
from ._custom_types import DTypeLike
from ._distribution import DiagonalGaussian
from ._halo import to_chw
from ._policy import Policy
from ._xla import compiler_options


Method = Literal["encode", "decode"]
_METHODS = ("encode", "decode")


def to_pixels(image: Float[Array, "c h w"]) -> UInt8[Array, "h w c"]:
    """An image in `[-1, 1]` as 8-bit pixels, channels last: clipped, scaled to
    `[0, 255]` and rounded half up, as `eqx_vae`'s image files are written."""
    pixels = jnp.clip((image.astype(jnp.float32) + 1.0) * 127.5 + 0.5, 0.0, 255.0)
    return jnp.transpose(pixels.astype(jnp.uint8), (1, 2, 0))


def from_pixels(pixels: UInt8[Array, "h w c"]) -> Float[Array, "c h w"]:
    """8-bit pixels, channels last, as a float32 image in `[-1, 1]`, channels first."""
    return jnp.transpose(pixels.astype(jnp.float32) / 127.5 - 1.0, (2, 0, 1))


def forward(
    method: Method, policy: Policy, *, pixels: bool = False, bucketed: bool = False
) -> Callable[..., Any]:
    """The function of one unbatched input that a compiled program runs:
    `f(model, x)`, or `f(model, x, valid)` when `bucketed` (only the top-left
    fractions `valid` of `x`'s rows and columns are the input; see `Scope`).

    - `"encode"`: an image `(C, H, W)` in `[-1, 1]`, or 8-bit pixels `(H, W, C)` when
        `pixels`, to the posterior;
    - `"decode"`: a latent `(C, h, w)` to the image, or to 8-bit pixels `(H, W, C)`
        when `pixels`.
    """

    def encode(model: AutoencoderKL, x: Array, valid: Array | None = None) -> DiagonalGaussian:
        image = from_pixels(x) if pixels else x
        return posterior(model._run(model._encode_steps(), image, policy, valid))

    def decode(model: AutoencoderKL, z: Array, valid: Array | None = None) -> Array:
        image = to_chw(model._run(model._decode_steps(), z, policy, valid))
        return to_pixels(image) if pixels else image

    run = encode if method == "encode" else decode
    return run if bucketed else (lambda model, x: run(model, x))


def input_spec(
    model: AutoencoderKL,
    method: Method,
    size: tuple[int, int],
    batch: int | None,
    dtype: Any,
    pixels: bool,
) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the input of `method` for images of `size` (height,
    width, in pixels)."""
    height, width = size
    batch_axes = () if batch is None else (batch,)
    if method == "decode":
        f = model.spatial_factor
        shape = (model.latent_channels, height // f, width // f)
        return jax.ShapeDtypeStruct(batch_axes + shape, dtype)
    if pixels:
        return jax.ShapeDtypeStruct((*batch_axes, height, width, model.in_channels), jnp.uint8)
    return jax.ShapeDtypeStruct((*batch_axes, model.in_channels, height, width), dtype)


def check_size(model: AutoencoderKL, size: Sequence[int], what: str = "`size`") -> tuple[int, int]:
    """`size` as `(height, width)`, checked to be positive multiples of the spatial
    factor."""
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"{what} must be (height, width) in pixels, got {tuple(size)}.")
    f = model.spatial_factor
    if any(int(s) % f for s in size):
        raise ValueError(
            f"{what} {tuple(size)} must be a multiple of the model's spatial factor {f} "
            "in both dimensions."
        )
    return int(size[0]), int(size[1])


class Compiled:
    """An encoder or decoder compiled ahead of time for one input shape and dtype: call
    it on an input of that shape. Made by [`eqx_vae.compile`][].

    Its attributes: `method`, `size` (the image's height and width), `batch`,
    `pixels`, `input` (the input's shape and dtype, a `jax.ShapeDtypeStruct`),
    `executable` (the `jax.stages.Compiled`, for its `cost_analysis()`,
    `memory_analysis()` or `as_text()`) and `compile_seconds`."""

    method: Method
    size: tuple[int, int]
    batch: int | None
    pixels: bool
    input: jax.ShapeDtypeStruct
    executable: jax.stages.Compiled
    compile_seconds: float

    def __init__(
        self,
        model: AutoencoderKL,
        method: Method,
        size: tuple[int, int],
        *,
        batch: int | None,
        policy: Policy,
        pixels: bool,
        bucketed: bool,
        input_dtype: Any,
        backend: str | None,
    ):
        self.method, self.size, self.batch, self.pixels = method, size, batch, pixels
        self._bucketed = bucketed
        self.input = input_spec(model, method, size, batch, input_dtype, pixels)
        params, static = eqx.partition(model, eqx.is_array)
        one = forward(method, policy, pixels=pixels, bucketed=bucketed)

        def run(params: Any, *args: Array) -> Any:
            f = lambda *a: one(eqx.combine(params, static), *a)  # noqa: E731
            return f(*args) if batch is None else jax.vmap(f)(*args)

        args: list[Any] = [self.input]
        if bucketed:
            args.append(jax.ShapeDtypeStruct((*self.input.shape[:-3], 2), jnp.float32))
        start = time.perf_counter()
        lowered = jax.jit(run).lower(params, *args)
        self.executable = lowered.compile(compiler_options=compiler_options(backend))
        self.compile_seconds = time.perf_counter() - start
        self._params = params

    def __call__(self, x: Any, valid: Any = None) -> Any:
        """Runs the program on `x`, an array of `self.input`'s shape and dtype (a NumPy
        array is copied to the device first)."""
        shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
        if shape != tuple(self.input.shape) or np.dtype(dtype) != np.dtype(self.input.dtype):
            raise ValueError(
                f"This {self.method} program was compiled for inputs of shape "
                f"{tuple(self.input.shape)} and dtype {np.dtype(self.input.dtype)}, got shape "
                f"{shape} and dtype {dtype}. Compile one for that shape "
                "(`eqx_vae.compile`), or use `eqx_vae.Codec` for images of any size."
            )
        if self._bucketed:
            return self.executable(self._params, x, valid)
        return self.executable(self._params, x)

    def __repr__(self) -> str:
        return (
            f"Compiled({self.method}, size={self.size}, batch={self.batch}, "
            f"input={tuple(self.input.shape)} {np.dtype(self.input.dtype)}, "
            f"pixels={self.pixels})"
        )


def compile(
    model: AutoencoderKL,
    method: Method,
    size: Sequence[int],
    *,
    batch: int | None = None,
    dtype: DTypeLike | None = None,
    policy: Policy | None = None,
    pixels: bool = False,
    input_dtype: DTypeLike | None = None,
    backend: str | None = None,
) -> Compiled:
    """Compiles `model`'s encoder or decoder ahead of time for images of one size,
    under the compiler options that make it fastest on the backend
    ([`eqx_vae.compiler_options`][]).

    **Arguments:**

    - `model`: the autoencoder; its parameters are held by the result.
    - `method`: `"encode"` (image to posterior) or `"decode"` (latent to image).
    - `size`: the image's `(height, width)` in pixels, multiples of the spatial factor
        (a decoder takes latents of `(height / f, width / f)`).
    - `batch`: the batch size: inputs get a leading batch axis; `None` (the default)
        compiles for one unbatched input.
    - `dtype`, `policy`: the compute dtype and policy, as in
        [`eqx_vae.AutoencoderKL.encode`][].
    - `pixels`: exchange images as 8-bit pixels, channels last: the encoder takes
        `uint8` `(height, width, channels)` images and the decoder returns them (clipped,
        scaled and rounded on the device, as `eqx-vae` writes image files: a quarter
        of float32's bytes to copy off the device).
    - `input_dtype`: the dtype of the float input (float32 by default); ignored for
        8-bit pixels.
    - `backend`: the backend to compile for (JAX's default backend by default).

    **Returns:**

    A [`eqx_vae.Compiled`][] program: `program(x)` for `x` of shape `program.input`.
    The encoder returns a [`eqx_vae.DiagonalGaussian`][] (with the batch axis in front
    of its arrays' shapes when batched), the decoder an image `(channels, height,
    width)` (float32 under a half-precision policy) or 8-bit pixels.

    Every call compiles: keep the program and call it many times, or let
    [`eqx_vae.Codec`][] keep one per shape. Equal to `eqx.filter_jit(model.decode)`
    and friends (the same computation), only compiled once, ahead of time, with the
    options XLA needs to be fast on CPU.

    !!! Example

        ```python
        decode = eqx_vae.compile(model, "decode", (512, 512), batch=4, pixels=True)
        pixels = decode(latents)  # (4, 4, 64, 64) float32 -> (4, 512, 512, 3) uint8
        ```
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be 'encode' or 'decode', got {method!r}.")
    if batch is not None and (int(batch) != batch or batch < 1):
        raise ValueError(f"`batch` must be a positive integer or None, got {batch!r}.")
    return Compiled(
        model,
        method,
        check_size(model, size),
        batch=batch,
        policy=model.resolve_policy(policy, dtype=dtype),
        pixels=pixels,
        bucketed=False,
        input_dtype=jnp.float32 if input_dtype is None else input_dtype,
        backend=backend,
    )


# Bucket edges in pixels: an image's height and width are each padded up to the first
# edge at least as large (beyond the last, to a multiple of the last). The steps grow
# with the size, so padding wastes at most half the work and a folder of photographs of
# many sizes needs a few programs.
DEFAULT_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


class Codec:
    """Encodes and decodes images and latents of any size with a few compiled programs.

    Each input is padded up to a bucket shape (its height and width each rounded up
    to one of `buckets`), run through the program compiled for that shape, and cropped
    back. The padding is invisible to the result: the programs zero it before every
    convolution and leave it out of GroupNorm statistics and attention, so the
    output equals that of the input alone (up to floating-point reordering, within
    1e-6 relative). Programs are compiled on first use of a shape (or ahead of time
    with `prepare`) under the backend's compiler options, and kept.

    Images whose height or width is not a multiple of the spatial factor (times the
    latent patch of FLUX.2) are first edge-padded to one, as the command line does: the
    latent covers the padded image, and `reconstruct` crops the result back.

    !!! Example

        ```python
        codec = eqx_vae.Codec(model)
        for image in images:  # (3, H, W) in [-1, 1], any H and W
            latent = codec.encode(image).mode()
            pixels = codec.decode(latent, pixels=True)  # (H', W', 3) uint8
        ```
    """

    model: AutoencoderKL
    buckets: tuple[int, ...]

    def __init__(
        self,
        model: AutoencoderKL,
        *,
        dtype: DTypeLike | None = None,
        policy: Policy | None = None,
        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
        backend: str | None = None,
    ):
        """**Arguments:**

        - `model`: the autoencoder.
        - `dtype`, `policy`: the compute dtype and policy, as in
            [`eqx_vae.AutoencoderKL.encode`][].
        - `buckets`: the bucket edges in pixels, increasing multiples of the spatial
            factor (times FLUX.2's latent patch); `None` compiles one program per input
            shape instead.
        - `backend`: the backend to compile for (JAX's default backend by default).
        """
        self.model = model
        self._policy = model.resolve_policy(policy, dtype=dtype)
        self._backend = backend
        ph, pw = model.config.latent_patch
        self._multiple = (model.spatial_factor * ph, model.spatial_factor * pw)
        if buckets is None:
            self.buckets = ()
        else:
            self.buckets = tuple(int(b) for b in buckets)
            step = int(np.lcm(*self._multiple))
            if (
                not self.buckets
                or any(b <= 0 or b % step for b in self.buckets)
                or list(self.buckets) != sorted(set(self.buckets))
            ):
                raise ValueError(
                    f"`buckets` must be increasing positive multiples of {step} (the "
                    f"spatial factor times the latent patch), got {self.buckets}."
                )
        self._programs: dict[tuple, Compiled] = {}

    @property
    def programs(self) -> tuple[Compiled, ...]:
        """The programs compiled so far."""
        return tuple(self._programs.values())

    def bucket(self, height: int, width: int) -> tuple[int, int]:
        """The padded image size `(height, width)` an image of this size runs at."""
        h = -(-height // self._multiple[0]) * self._multiple[0]
        w = -(-width // self._multiple[1]) * self._multiple[1]
        if not self.buckets:
            return h, w
        return self._edge(h), self._edge(w)

    def _edge(self, n: int) -> int:
        for edge in self.buckets:
            if n <= edge:
                return edge
        last = self.buckets[-1]
        return -(-n // last) * last

    def prepare(
        self,
        method: Method,
        size: Sequence[int],
        *,
        batch: int | None = None,
        pixels: bool = False,
    ) -> Compiled:
        """The program for inputs of image size `size` (before bucketing), compiled now
        if it is not yet: call it ahead of the first request to take compilation off
        the request path."""
        bucket = self.bucket(*check_size(self.model, size))
        key = (method, bucket, batch, pixels)
        if key not in self._programs:
            self._programs[key] = Compiled(
                self.model,
                method,
                bucket,
                batch=batch,
                policy=self._policy,
                pixels=pixels and method == "decode",
                bucketed=bool(self.buckets),
                input_dtype=jnp.float32,
                backend=self._backend,
            )
        return self._programs[key]

    def encode(self, image: Any) -> DiagonalGaussian:
        """The posterior of an image `(C, H, W)` in `[-1, 1]`, or of a batch
        `(B, C, H, W)` of images of one size. The latent is `(latent_channels,
        ceil(H / f), ceil(W / f))` (rounded up to FLUX.2's latent patch): it covers
        the image edge-padded to a multiple of the spatial factor."""
        x = np.asarray(image, np.float32)
        self._check(x, "encode", "image", self.model.in_channels)
        h, w = x.shape[-2:]
        mh, mw = self._multiple
        full = (-(-h // mh) * mh, -(-w // mw) * mw)
        edge = [(0, 0)] * (x.ndim - 2) + [(0, full[0] - h), (0, full[1] - w)]
        x = np.pad(x, edge, mode="edge")
        out = self._run("encode", x, full, full, pixels=False)
        f = self.model.spatial_factor
        return jax.tree.map(lambda a: a[..., : full[0] // f, : full[1] // f], out)

    def decode(self, latent: Any, *, pixels: bool = False) -> Array:
        """The image of a latent `(C, h, w)` (unscaled), or of a batch `(B, C, h, w)`:
        `(C, h * f, w * f)` in float, or 8-bit pixels `(h * f, w * f, C)` when
        `pixels` (converted on the device)."""
        z = np.asarray(latent, np.float32)
        self._check(z, "decode", "latent", self.model.latent_channels)
        f = self.model.spatial_factor
        size = (z.shape[-2] * f, z.shape[-1] * f)
        out = self._run("decode", z, size, size, pixels=pixels)
        return out[..., : size[0], : size[1], :] if pixels else out[..., : size[0], : size[1]]

    def reconstruct(self, image: Any, *, pixels: bool = False) -> Array:
        """Encodes an image (or a batch of one size), decodes the posterior mode, and
        crops the result to the input's size."""
        h, w = np.shape(image)[-2:]
        out = self.decode(self.encode(image).mode(), pixels=pixels)
        return out[..., :h, :w, :] if pixels else out[..., :h, :w]

    def _run(
        self, method: Method, x: np.ndarray, size: tuple[int, int], valid: tuple, pixels: bool
    ) -> Any:
        """`x` zero-padded to its bucket and run there; the result is not cropped."""
        batch = x.shape[0] if x.ndim == 4 else None
        program = self.prepare(method, size, batch=batch, pixels=pixels)
        f = 1 if method == "encode" else self.model.spatial_factor
        bh, bw = program.size[0] // f, program.size[1] // f
        pad = [(0, 0)] * (x.ndim - 2) + [(0, bh - x.shape[-2]), (0, bw - x.shape[-1])]
        x = np.pad(x, pad)
        if not self.buckets:
            return program(x)
        fractions = np.array([valid[0] / program.size[0], valid[1] / program.size[1]], np.float32)
        if batch is not None:
            fractions = np.broadcast_to(fractions, (batch, 2))
        return program(x, fractions)

    def _check(self, x: np.ndarray, method: str, what: str, channels: int) -> None:
        if x.ndim not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(
                f"`Codec.{method}` takes one {what} ({channels}, height, width) or a batch "
                f"(batch, {channels}, height, width), got shape {x.shape}."
            )
