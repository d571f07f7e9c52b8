"""Hostile files: every weights file and image loads or fails with the promised error, in bounded memory and time.

The fixed set of the fuzz harness (``fuzz/``): real files of every format (torch writes the .pth
seeds), the crafted hostile files of each class in issue 10, and a seeded sample of mutations,
each loaded in a child process under an address-space limit and a time limit. The long run is
``python -m fuzz --cases 5000 --seed 1``.
"""
import random
import re

import pytest

pytest.importorskip("torch")  # the .pth seeds are written by torch, as users' files are

from fuzz import run_cases, summary  # noqa: E402
from fuzz.cases import IMAGE, hostile, mutate, seeds  # noqa: E402

MUTATIONS = 300


@pytest.fixture(scope="module")
def results():
    pool = seeds()
    # One generator per case, as `python -m fuzz` does: torch.save's seed files differ between runs (a
    # fresh serialization id), which with one shared generator changed the mutations of every other format.
    cases = pool + hostile() + [mutate(pool[i % len(pool)], random.Random(f"0-{i}"), i) for i in range(MUTATIONS)]
    return run_cases(cases, workers=2)  # two children: the suite's main process only waits here


def test_every_case_loads_or_fails_cleanly(results):
    """No crash, hang, MemoryError or other exception type; every refusal names its file."""
    assert not [r for r in results if not r.passed], summary(results)


def test_real_files_of_every_format_are_read(results):
    """The controls: each seed reads (weights) or loads (images), so the refusals above are the files' doing."""
    read = {r.case.family: r.outcome for r in results if r.case.name.startswith("seed") and "_mut" not in r.case.name}
    assert {"pth_zip", "pth_legacy", "safetensors", "npz", "image_png", "image_jpeg", "image_webp", "image_gif",
            "image_bmp", "image_tiff"} <= set(read)
    bad = [r for r in results if r.case.name.startswith("seed") and "_mut" not in r.case.name
           and r.outcome not in ("loaded", "read")]
    assert not bad, [(r.case.family, r.case.name, r.outcome, r.message) for r in bad]


def test_each_hostile_file_is_refused_for_its_own_reason(results):
    hostile_results = [r for r in results if r.case.expect is not None]
    assert len(hostile_results) >= 80
    wrong = []
    for r in hostile_results:
        if r.case.expect == "read":
            ok = r.outcome in ("loaded", "read")
        else:
            # "read": the reader accepted the file and building the model refused it (a WeightsError too)
            errors = ("ImageError",) if r.case.kind == IMAGE else ("WeightsError", "read")
            ok = r.outcome in errors and re.search(r.case.expect, r.message) is not None
        if not ok:
            wrong.append(f"{r.case.name}: {r.outcome}: {r.message[:200]} (expected {r.case.expect!r})")
    assert not wrong, "\n".join(wrong)


def test_mutations_reach_the_parsers(results):
    """A fuzz run that only ever hits one early check proves little: mutations must yield several outcomes per format."""
    mutated = [r for r in results if "_mut" in r.case.name]
    assert len(mutated) == MUTATIONS
    for family in ("pth_zip", "pth_legacy", "npz", "safetensors"):
        messages = {re.sub(r"\d+", "N", r.message.split(": ", 1)[-1])[:40] for r in mutated if r.case.family == family}
        assert len(messages) >= 3, (family, messages)
