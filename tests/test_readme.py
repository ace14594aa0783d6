"""Every code block of the README runs as written.

```python blocks run in order in one namespace; ```bash blocks run in order, in one scratch directory, with
the environment's ``embcompress`` first on PATH, so a later block can use what an earlier one wrote.
```sh blocks are installation steps (pip, make) and are not run here: `make test` itself performs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def test_readme_has_runnable_blocks():
    assert blocks("python") and blocks("bash")
    # every fence names its language, so no block escapes the checks below
    text = README.read_text()
    assert len(re.findall(r"^```", text, re.M)) == 2 * len(FENCE.findall(text))


@pytest.mark.slow
def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)


@pytest.mark.slow
def test_bash_blocks_run(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    for i, script in enumerate(blocks("bash")):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README bash block {i} failed:\n{script}\n--- stderr ---\n{r.stderr[-3000:]}"
