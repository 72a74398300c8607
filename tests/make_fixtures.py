"""Writes `tests/fixtures/parity_<case>.npz`: random weights, inputs and the outputs of
diffusers' PyTorch AutoencoderKL for each case in `parity_cases.py`.

Run from the repository root with the `parity` extra installed:

    python tests/make_fixtures.py                          # every case
    python tests/make_fixtures.py flux2_narrow_decoder     # only the cases named
"""

import json
import pathlib
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from parity_cases import CASES, diffusers_reference


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def main(names: list[str]) -> None:
    import diffusers
    import torch

    unknown = set(names) - {case.name for case in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}")
    FIXTURES.mkdir(exist_ok=True)
    for seed, case in enumerate(CASES):
        if names and case.name not in names:
            continue
        arrays = diffusers_reference(case, seed)
        path = FIXTURES / f"parity_{case.name}.npz"
        arrays.update(
            config=np.array(json.dumps(case.config)),
            seed=np.array(seed),
            versions=np.array(f"diffusers {diffusers.__version__}, torch {torch.__version__}"),
        )
        np.savez_compressed(path, allow_pickle=False, **arrays)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
