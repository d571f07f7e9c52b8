"""The child process that loads fuzz cases: ``python -m fuzz.child CASES.json ALLOWANCE_BYTES``.

It imports npresnet, then caps its own address space (RLIMIT_AS) at what it uses now plus the
allowance, and loads each case in turn, printing one JSON line when a case starts and one with
its outcome, so that the parent knows which case a crash or hang belongs to.

Outcomes: "loaded"; "WeightsError" / "ImageError" (the promised refusals); anything else is
reported by exception type (MemoryError included) and counts as a failure.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np


def load_weights(path: str) -> None:
    from npresnet.formats import read_weights
    from npresnet.model import ResNet
    from npresnet.preprocess import preset_for

    state, meta = read_weights(path)
    preset = preset_for(SimpleNamespace(meta=meta))  # what classify would do with the file's metadata
    preset(np.zeros((8, 8, 3), np.uint8))
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        ResNet.from_state_dict(state, backend="numpy", meta=meta, source=path)


def load_image(path: str) -> None:
    from npresnet.preprocess import ImageClassification

    ImageClassification(crop_size=16, resize_size=16)(path)


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> int:
    import npresnet  # noqa: F401  (imported before the limit: its imports are not the cases' doing)
    from npresnet.errors import ImageError, WeightsError

    cases = json.loads(open(argv[0]).read())
    allowance = int(argv[1])
    limit = vm_bytes() + allowance
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case in cases:
        print(json.dumps({"id": case["id"], "event": "start"}), flush=True)
        started = time.perf_counter()
        outcome, message = "loaded", ""
        try:
            (load_weights if case["kind"] == "weights" else load_image)(case["path"])
        except (WeightsError, ImageError) as exc:
            outcome, message = type(exc).__name__, str(exc)
            if case["path"] not in message:
                outcome = f"{outcome} (not naming the file)"
        except BaseException as exc:  # noqa: BLE001  (every other outcome is what the fuzzer is looking for)
            outcome, message = f"other: {type(exc).__name__}", str(exc)[:300]
        seconds = time.perf_counter() - started
        print(json.dumps({"id": case["id"], "event": "done", "outcome": outcome, "message": message[:300],
                          "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
