"""A short run of every fuzz target (fuzz/, atheris): its seed corpus, then a
couple of seconds of fuzzing; a crash fails the test with the input.

`make fuzz` runs the same targets for longer (FUZZ_SECONDS each).
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
# Seconds of fuzzing per target, after its corpus; two targets run at a time.
SECONDS = 1
AT_ONCE = 2


def _runner():
    spec = importlib.util.spec_from_file_location("fuzz_run", FUZZ / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every target's short run, (held, output) by target name."""
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        # A pip dependency of the test extras, so never skipped: a missing one is a broken install.
        pytest.fail(f"atheris does not import ({e}); install the test extras: pip install '.[test]'")
    work = tmp_path_factory.mktemp("fuzz-work")
    crashes = tmp_path_factory.mktemp("fuzz-crashes")
    with ThreadPoolExecutor(AT_ONCE) as pool:
        runs = {t: pool.submit(runner.run, t, SECONDS, work, crashes) for t in runner.TARGETS}
        return {t: run.result() for t, run in runs.items()}


def test_every_target_has_a_seed_corpus():
    """Each fuzz target starts from a few real inputs of its own."""
    assert len(runner.TARGETS) >= 8, runner.TARGETS
    for target in runner.TARGETS:
        seeds = list((FUZZ / "corpus" / target).iterdir())
        assert len(seeds) >= 3, f"fuzz/corpus/{target}/ holds {len(seeds)} inputs"


@pytest.mark.parametrize("target", runner.TARGETS)
def test_target_survives_a_short_run(results, target):
    """The target holds on its seed corpus and on what a short fuzzing run makes of it."""
    held, output = results[target]
    assert held, f"fuzz target {target} crashed:\n{runner.summary(output)}"


def test_runner_refuses_an_unknown_target(capsys, monkeypatch):
    """`make fuzz` with a misspelt target says so, instead of fuzzing nothing."""
    monkeypatch.setattr(sys, "argv", ["run.py", "--seconds", "1", "no-such-target"])
    with pytest.raises(SystemExit) as exit:
        runner.main()
    assert exit.value.code == 2
    assert "no such target: no-such-target" in capsys.readouterr().err
