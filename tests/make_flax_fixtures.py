"""Writes the references from diffusers' `FlaxAutoencoderKL`:

- `tests/fixtures/flax_<case>.npz` for each case in `flax_cases.py`: the config, random
  parameters by Flax path (`param/encoder/conv_in/kernel`, stored as float16; they are
  float16 values), an image and a latent, and the Flax model's posterior mean and
  log-variance and decode (unbatched, channels-first);
- `tests/fixtures/flax_msgpack/`: the first case's parameters in float16 as
  `FlaxAutoencoderKL.save_pretrained` writes them (`config.json` and
  `diffusion_flax_model.msgpack`), for the msgpack reader.

It needs diffusers 0.39 or older (the last releases with Flax models) and flax, e.g. the
`bench` extra. Run from the repository root:

    python tests/make_flax_fixtures.py
"""

import json
import pathlib
import shutil
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from flax_cases import CASES, flatten, flax_model, flax_outputs, inputs, random_params


FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MSGPACK_FOLDER = FIXTURES / "flax_msgpack"


def main() -> None:
    import importlib

    import diffusers
    import jax

    flax = importlib.import_module("flax")

    versions = f"diffusers {diffusers.__version__}, flax {flax.__version__}, jax {jax.__version__}"
    FIXTURES.mkdir(exist_ok=True)
    for seed, case in enumerate(CASES):
        model = flax_model(case.config)
        params = random_params(model, seed)
        image, latent = inputs(case, seed)
        arrays = {f"param/{k}": v.astype(np.float16) for k, v in flatten(params).items()}
        arrays.update(
            image=image,
            latent=latent,
            **flax_outputs(model, params, image, latent),
            config=np.array(json.dumps(case.config)),
            seed=np.array(seed),
            versions=np.array(versions),
        )
        path = FIXTURES / f"flax_{case.name}.npz"
        np.savez_compressed(path, allow_pickle=False, **arrays)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
        if seed == 0:
            shutil.rmtree(MSGPACK_FOLDER, ignore_errors=True)
            half = jax.tree_util.tree_map(lambda a: a.astype(np.float16), params)
            model.save_pretrained(MSGPACK_FOLDER, params=half)
            size = sum(p.stat().st_size for p in MSGPACK_FOLDER.iterdir())
            print(f"wrote {MSGPACK_FOLDER} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
