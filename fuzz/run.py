"""Run the fuzz targets, each for a bounded time, and say which crashed.

    python fuzz/run.py [--seconds N] [--work DIR] [--crashes DIR] [TARGET ...]

Each target (fuzz/fuzz_<target>.py) starts from its seed corpus
(fuzz/corpus/<target>/, never written to) and keeps what it finds new in
DIR/<target>/ (default fuzz/work/), so that a later run goes on from there.
A crashing input is written to fuzz/crashes/ (or --crashes) as
<target>-crash-<sha1>, and the exit status is 1.  `make fuzz` runs this
with FUZZ_SECONDS; the test suite runs it for a few seconds per target.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))
# An input that takes longer than this is a hang, reported as a crash.
TIMEOUT = 20


def command(target: str, seconds: float, work: Path, crashes: Path) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, str(HERE / f"fuzz_{target}.py"), str(work), str(HERE / "corpus" / target),
        f"-max_total_time={max(1, round(seconds))}", f"-timeout={TIMEOUT}",
        f"-artifact_prefix={crashes}/{target}-", "-print_final_stats=1",
    ]
    dictionary = HERE / "dicts" / f"{target}.dict"
    if dictionary.exists():
        args.append(f"-dict={dictionary}")
    return args


def run(target: str, seconds: float, work: Path, crashes: Path) -> tuple[bool, str]:
    """Fuzz one target; (whether it held, its output)."""
    done = subprocess.run(
        command(target, seconds, work / target, crashes), check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", cwd=HERE.parent, timeout=seconds + TIMEOUT + 60,
    )
    return done.returncode == 0, done.stdout


def summary(output: str) -> str:
    """The lines that say what happened: the crash and its input, or the final counts."""
    lines = [line for line in output.splitlines() if not line.startswith(("INFO: Instrumenting", "#", "WARNING: Failed to find"))]
    for marker in ("=== Uncaught Python exception", "ERROR: libFuzzer", "==ERROR", "Traceback"):
        at = next((i for i, line in enumerate(lines) if marker in line), None)
        if at is not None:
            return "\n".join(lines[at : at + 60])
    return "\n".join(line for line in lines if line.startswith(("stat::number_of_executed_units", "Done")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--crashes", type=Path, default=HERE / "crashes")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"some of: {' '.join(TARGETS)} (default: all)")
    options = parser.parse_args()
    unknown = set(options.targets) - set(TARGETS)
    if unknown:
        parser.error(f"no such target: {' '.join(sorted(unknown))} (there are: {' '.join(TARGETS)})")
    failed = []
    for target in options.targets or TARGETS:
        started = time.monotonic()
        held, output = run(target, options.seconds, options.work, options.crashes)
        print(f"{target}: {'ok' if held else 'CRASH'} ({time.monotonic() - started:.0f} s)", flush=True)
        if not held:
            failed.append(target)
            print(summary(output), flush=True)
    if failed:
        print(f"crashed: {' '.join(failed)}; the inputs are in {options.crashes}/", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
