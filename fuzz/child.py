"""The child process that loads fuzz cases: ``python -m fuzz.child CASES.json ALLOWANCE_BYTES``.

It imports npresnet, then caps its own address space (RLIMIT_AS) at what it uses now plus the
allowance, and loads each case in turn, printing one JSON line when a case starts and one with
its outcome, so that the parent knows which case a crash or hang belongs to.

Outcomes: "loaded"; "read" (the reader accepted the weights file, a later step refused it with a
WeightsError); "WeightsError" / "ImageError" (the promised refusals); anything else is reported by
exception type (MemoryError included) and counts as a failure.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np


def load_weights(path: str) -> tuple[str, str]:
    """"loaded" (a model and its preprocessing), or "read" when the reader accepted the file and a
    later step refused it with a WeightsError (not a ResNet state dict, say)."""
    from npresnet.checkpoint import read_safetensors, read_torch_checkpoint
    from npresnet.errors import WeightsError
    from npresnet.formats import read_weights
    from npresnet.model import ResNet
    from npresnet.preprocess import preset_for
    from npresnet.weights import load_npz

    reader = {".npz": load_npz, ".safetensors": read_safetensors}.get(path[path.rfind("."):], read_torch_checkpoint)
    reader(path)
    try:
        state, meta = read_weights(path)
        preset = preset_for(SimpleNamespace(meta=meta))  # what classify does with the file's metadata
        preset(np.zeros((8, 8, 3), np.uint8))
        ResNet.from_state_dict(state, backend="numpy", meta=meta, source=path)
    except WeightsError as exc:
        return "read", str(exc)
    return "loaded", ""


def load_image(path: str) -> tuple[str, str]:
    from npresnet.preprocess import ImageClassification

    ImageClassification(crop_size=16, resize_size=16)(path)
    return "loaded", ""


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
        started = time.process_time()  # CPU time: on a shared machine, wall time measures the neighbours
        outcome, message = "loaded", ""
        try:
            outcome, message = (load_weights if case["kind"] == "weights" else load_image)(case["path"])
        except (WeightsError, ImageError) as exc:
            outcome, message = type(exc).__name__, str(exc)
            if case["path"] not in message:
                outcome = f"{outcome} (not naming the file)"
        except BaseException as exc:  # noqa: BLE001  (every other outcome is what the fuzzer is looking for)
            outcome, message = f"other: {type(exc).__name__}", str(exc)[:300]
        seconds = time.process_time() - started
        print(json.dumps({"id": case["id"], "event": "done", "outcome": outcome, "message": message[:300],
                          "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
