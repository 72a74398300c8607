"""Writes `tests/golden/parameters_<preset>.txt`: every parameter name and shape of
the published configurations, in pytree (serialisation) order.

The golden files are committed: a change to them is a change to the checkpoint format,
and must be called out in CHANGELOG.md. Run from the repository root:

    python tests/make_golden.py
"""

import pathlib

import eqx_vae
from eqx_vae._state_dict import abstract_model, named_parameters


GOLDEN = pathlib.Path(__file__).parent / "golden"
PRESETS_WITH_GOLDEN = ("sd15", "flux1", "flux2")


def golden_lines(preset: str) -> list[str]:
    config = getattr(eqx_vae.AutoencoderKLConfig, preset)()
    return [
        f"{name} {'x'.join(map(str, leaf.shape)) or '()'}"
        for name, leaf in named_parameters(abstract_model(config))
    ]


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for preset in PRESETS_WITH_GOLDEN:
        path = GOLDEN / f"parameters_{preset}.txt"
        path.write_text("\n".join(golden_lines(preset)) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
