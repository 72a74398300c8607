"""JAX's persistent compilation cache: a second process finds the programs
`eqx_vae.compile` built in the first, and does not compile them again."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


SCRIPT = textwrap.dedent(
    """
    import json, sys, jax
    sys.path.insert(0, "tests")
    import eqx_vae
    from helpers import small_config

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event.endswith("cache_hits") else None
    )
    model = eqx_vae.AutoencoderKL(small_config(), key=jax.random.key(0))
    program = eqx_vae.compile(model, "decode", (16, 16), batch=2)
    out = program(jax.numpy.zeros(program.input.shape))
    print(json.dumps({"hits": len(hits), "sum": float(out.sum())}))
    """
)


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_program(tmp_path):
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0
    assert runs[1]["hits"] >= 1
    assert runs[1]["sum"] == runs[0]["sum"]
    assert any(tmp_path.iterdir())
