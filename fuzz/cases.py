"""The fuzz cases: real files of every format (seeds), their mutations, and crafted hostile files by class.

A case is bytes plus the suffix it is saved under and the loader it goes to ("weights":
``read_weights``, then the model and the preprocessing its metadata asks for; "image":
``load_image`` and the preprocessing preset). Seeds of the .pth formats are written by torch
where it is installed (it is in the test environment) and skipped otherwise.
"""
from __future__ import annotations

import collections
import io
import json
import random
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import craft as c


@dataclass
class Case:
    family: str  # "pth_zip", "image_png", "hostile_pickle", ...
    name: str
    data: bytes
    suffix: str
    kind: str  # "weights" or "image"
    expect: str | None = None  # hostile cases: a regex the refusal must match, or "read" where reading is right


WEIGHTS, IMAGE = "weights", "image"


# --- seeds: real files ------------------------------------------------------------------------------


def _torch_seeds() -> list[Case]:
    try:
        import torch
    except ImportError:
        return []
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.conv1 = torch.nn.Conv2d(3, 4, 3, bias=False)
    module.bn1 = torch.nn.BatchNorm2d(4)
    module.fc = torch.nn.Linear(4, 3)
    state = module.state_dict()  # an OrderedDict with _metadata, as real checkpoints have
    base = torch.randn(40)
    layouts = {
        "bare": state,
        "half": collections.OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state.items()),
        "bf16": collections.OrderedDict((k, v.bfloat16() if v.is_floating_point() else v) for k, v in state.items()),
        "nested": {"epoch": 3, "state_dict": collections.OrderedDict(("module." + k, v) for k, v in state.items()),
                   "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}},
        "views": collections.OrderedDict(conv1=base[2:38].view(4, 9)[:, ::2], same=base[2:38].view(4, 9)[:, ::2], t=base[:12].view(3, 4).t()),
    }
    cases = []
    for name, obj in layouts.items():
        for legacy in (False, True):
            buffer = io.BytesIO()
            torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
            family = "pth_legacy" if legacy else "pth_zip"
            cases.append(Case(family, f"seed_{name}", buffer.getvalue(), ".pth", WEIGHTS))
    return cases


def _safetensors_seed() -> list[Case]:
    rng = np.random.default_rng(0)
    arrays = {"conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype("<f4"), "bn1.running_mean": np.zeros(4, "<f2"),
              "fc.weight": rng.integers(0, 2**16, (3, 4)).astype("<u2"), "bn1.num_batches_tracked": np.array([5], "<i8")}
    names = {"<f4": "F32", "<f2": "F16", "<u2": "BF16", "<i8": "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in arrays.items():
        raw = v.tobytes()
        header[k] = {"dtype": names[v.dtype.str], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    return [Case("safetensors", "seed", c.safetensors_bytes(header, b"".join(blobs)), ".safetensors", WEIGHTS)]


def _npz_seeds() -> list[Case]:
    rng = np.random.default_rng(1)
    arrays = {"conv1.weight": c.npy_of(rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
              "fc.bias": c.npy_of(np.zeros(3)), "bn1.running_var": c.npy_of(np.ones(4, ">f4"))}
    meta = {"arch": "resnet18", "num_classes": 3, "stem": "imagenet", "crop_size": 32, "resize_size": 36,
            "classes": ["a", "b", "c"], "quantized": False, "dtype": "float32", "source": "x.pth"}
    return [Case("npz", "seed_stored", c.npz_bytes(arrays, meta), ".npz", WEIGHTS),
            Case("npz", "seed_deflated", c.npz_bytes(arrays, meta, method=8), ".npz", WEIGHTS)]


def _image_seeds() -> list[Case]:
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    made = {
        "png": [("rgb", rgb, {}), ("rgba", rgb.convert("RGBA"), {}), ("p", rgb.convert("P"), {}),
                ("i16", Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)), {})],
        "jpeg": [("baseline", rgb, {"quality": 80}), ("progressive", rgb, {"progressive": True}),
                 ("exif", rgb, {"exif": _exif_orientation(6)})],
        "webp": [("lossy", rgb, {}), ("lossless", rgb, {"lossless": True})],
        "gif": [("frames", rgb.convert("P"), {"save_all": True, "append_images": [rgb.rotate(90).convert("P")]})],
        "bmp": [("rgb", rgb, {})],
        "tiff": [("raw", rgb, {}), ("lzw", rgb, {"compression": "tiff_lzw"}), ("deflate", rgb, {"compression": "tiff_adobe_deflate"})],
        "ppm": [("rgb", rgb, {})],
        "avif": [("rgb", rgb, {})],
    }
    cases = []
    for fmt, variants in made.items():
        for name, image, options in variants:
            buffer = io.BytesIO()
            try:
                image.save(buffer, fmt.upper(), **options)
            except (KeyError, OSError, ValueError):  # a Pillow built without this encoder
                continue
            cases.append(Case(f"image_{fmt}", f"seed_{name}", buffer.getvalue(), "." + fmt, IMAGE))
    return cases


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def seeds() -> list[Case]:
    """One or more real files of every format."""
    return _torch_seeds() + _safetensors_seed() + _npz_seeds() + _image_seeds()


# --- mutations --------------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


def mutate_bytes(data: bytes, rng: random.Random, region: int | None = None) -> bytes:
    """1-3 random edits: bit flips, interesting bytes or integers, truncation, insertion, deletion, duplication."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        span = min(len(out), region or len(out))
        at = rng.randrange(span) if span else 0
        op = rng.randrange(8)
        if op == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[at] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == 2 and out:
            width = rng.choice([1, 2, 4, 8])
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            out[at : at + width] = value.to_bytes(width, rng.choice(["little", "big"]))
        elif op == 3:
            del out[rng.randrange(len(out) + 1):]
        elif op == 4:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 5 and out:
            del out[at : at + rng.randint(1, 64)]
        elif op == 6 and out:
            chunk = out[at : at + rng.randint(1, 256)]
            where = rng.randrange(len(out) + 1)
            out[where:where] = chunk * rng.randint(1, 8)
        elif op == 7 and out:
            # a decimal number (JSON headers, npy headers) replaced by an interesting one
            digits = [i for i in range(len(out)) if 48 <= out[i] <= 57]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(out) and 48 <= out[j] <= 57:
                    j += 1
                out[i:j] = str(rng.choice(INTERESTING + [-1, 10**30])).encode()
    return bytes(out)


def _mutate_zip_member(data: bytes, rng: random.Random) -> bytes:
    """Mutate one member of a (trusted seed) zip and write a consistent archive, so the edit reaches the parser."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [{"name": i.filename, "data": archive.read(i), "method": i.compress_type} for i in archive.infolist()]
    target = rng.choice([m for m in members if m["name"].endswith((".pkl", ".npy"))] or members)
    target["data"] = mutate_bytes(target["data"], rng, region=rng.choice([None, 128]))
    return c.zip_bytes(members)


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute each chunk's CRC, so that a mutation reaches the decoder instead of the checksum test."""
    import zlib

    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        length = struct.unpack(">I", out[at : at + 4])[0]
        end = at + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[at + 4 : end])))
        at = end + 4
    return bytes(out)


def mutate(seed: Case, rng: random.Random, index: int) -> Case:
    data = seed.data
    if seed.family in ("pth_zip", "npz") and rng.random() < 0.7:
        data = _mutate_zip_member(data, rng)
    elif seed.family == "safetensors" and rng.random() < 0.6:
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        data = mutate_bytes(data, rng, region=header_end)
    elif seed.kind == IMAGE and rng.random() < 0.5:
        data = mutate_bytes(data, rng, region=64)  # headers and the first chunks
    else:
        data = mutate_bytes(data, rng)
    if seed.family == "image_png" and rng.random() < 0.8:
        data = _fix_png_crcs(data)
    return Case(seed.family, f"{seed.name}_mut{index}", data, seed.suffix, seed.kind)


# --- crafted hostile files, by the classes of issue 10 --------------------------------------------


def _pickle_cases() -> list[tuple[str, bytes]]:
    deep_key = c.PROTO2 + c.EMPTY_DICT + c.EMPTY_TUPLE + c.TUPLE1 * 300_000 + c.NONE + c.SETITEM + c.STOP
    shared = c.EMPTY_TUPLE + (c.DUP + c.TUPLE2) * 80  # a tuple tree of 2**80 leaves in 160 bytes
    colliding = c.PROTO2 + c.EMPTY_DICT + c.MARK + b"".join(c.p_int(i * (2**61 - 1)) + c.NONE for i in range(1, 30_000)) + c.SETITEMS + c.STOP
    many_str_keys = c.PROTO2 + c.EMPTY_DICT + c.MARK + b"".join(c.p_str(f"k{i}") + c.NONE for i in range(50_000)) + c.SETITEMS + c.STOP
    build_items = (c.PROTO2 + c.ORDERED_DICT + c.MARK + c.p_str("items") + c.p_int(1) + c.p_str("get") + c.p_int(2) + b"d"
                   + c.BUILD + c.STOP)
    return [
        ("deep_tuple_key", deep_key),
        ("shared_tuple_key", c.PROTO2 + c.EMPTY_DICT + shared + c.NONE + c.SETITEM + c.STOP),
        ("shared_tuple_top", c.PROTO2 + shared + c.STOP),
        ("shared_tuple_pid", c.PROTO2 + c.EMPTY_DICT + c.p_str("conv1.weight") + shared + c.BINPERSID + c.SETITEM + c.STOP),
        ("shared_tuple_in_dict", c.PROTO2 + c.EMPTY_DICT + c.p_str("conv1.weight") + shared + c.SETITEM + c.STOP),
        ("colliding_int_keys", colliding),
        ("many_str_keys", many_str_keys),
        ("deep_list", c.PROTO2 + c.EMPTY_LIST * 200_000 + c.APPEND * 199_999 + c.STOP),
        ("memo_index_huge", c.PROTO2 + c.NONE + b"r" + struct.pack("<I", 0xFFFFFFF0) + c.STOP),
        ("memo_get_unset", c.PROTO2 + b"h\x05" + c.STOP),
        ("binbytes8_huge", c.PROTO2 + b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc" + c.STOP),
        ("bytearray8_huge", c.PROTO2 + b"\x96" + struct.pack("<Q", 1 << 34) + b"abc" + c.STOP),
        ("binunicode8_huge", c.PROTO2 + b"\x8d" + struct.pack("<Q", 1 << 33) + b"abc" + c.STOP),
        ("long4_huge", c.PROTO2 + b"\x8b" + struct.pack("<I", 1 << 20) + b"\x01" * (1 << 20) + c.STOP),
        ("build_items_on_ordereddict", build_items),
        ("build_on_global", c.PROTO2 + c.p_global("torch", "FloatStorage") + c.EMPTY_DICT + c.BUILD + c.STOP),
        ("global_os_system", c.PROTO2 + c.p_global("os", "system") + c.p_tuple(c.p_str("true")) + c.REDUCE + c.STOP),
        ("ordereddict_with_pairs", c.PROTO2 + c.p_global("collections", "OrderedDict")
         + c.p_tuple(c.MARK + c.p_tuple(c.EMPTY_TUPLE, c.NONE) + b"l") + c.REDUCE + c.STOP),
        ("setitems_on_tensor_args", c.PROTO2 + c.EMPTY_TUPLE + c.MARK + c.p_str("a") + c.NONE + c.SETITEMS + c.STOP),
        ("inst_opcode", c.PROTO2 + b"(ios\nsystem\n" + c.STOP),
        ("no_stop", c.PROTO2 + c.EMPTY_DICT),
        ("parameter_of_an_int", c.PROTO2 + c.p_global("torch._utils", "_rebuild_parameter")
         + c.p_tuple(c.p_int(1), c.NEWFALSE, c.ORDERED_DICT) + c.REDUCE + c.STOP),
        ("cycle", c.PROTO2 + c.EMPTY_LIST + b"q\x00" + b"h\x00" + c.APPEND + c.STOP),
    ]


def _tensor_cases() -> list[tuple[str, bytes, dict[str, bytes]]]:
    one = np.ones(1, np.float32).tobytes()
    block = np.arange(8192, dtype=np.float32).tobytes()
    mb = np.zeros(1 << 18, np.float32).tobytes()  # 1 MiB
    return [
        ("stride0_4gb", c.p_state_dict({"conv1.weight": c.p_tensor("0", 1, 0, (1 << 20, 1 << 10), (0, 0))}), {"0": one}),
        ("overlapping_views", c.p_state_dict({f"w{i}": c.p_tensor("0", 8192, i, (4096, 4096), (1, 1)) for i in range(64)}), {"0": block}),
        ("aliases_of_one_storage", c.p_state_dict({f"w{i}": c.p_tensor("0", 1 << 18, 0, (1 << 18,), (1,)) for i in range(3000)}), {"0": mb}),
        ("seventy_dims", c.p_state_dict({"w": c.p_tensor("0", 1, 0, (1,) * 70, (1,) * 70)}), {"0": one}),
        ("zero_size_huge_dims", c.p_state_dict({"w": c.p_tensor("0", 1, 0, (0, 1 << 62, 1 << 62), (1, 1, 1))}), {"0": one}),
        ("size_overflow", c.p_state_dict({"w": c.p_tensor("0", 1, 0, (1 << 40, 1 << 40), (1, 1))}), {"0": one}),
        ("storage_dtype_conflict", c.p_state_dict({"a": c.p_tensor("0", 1, 0, (1,), (1,)),
                                                   "b": c.p_tensor("0", 1, 0, (1,), (1,), "DoubleStorage")}), {"0": one}),
    ]


def _archive_cases() -> list[tuple[str, bytes, str]]:
    good_pkl = c.p_state_dict({"conv1.weight": c.p_tensor("0", 4, 0, (4,), (1,))})
    four = np.ones(4, np.float32).tobytes()
    mib = b"\0" * (1 << 20)
    npy_meta = c.npy_of(np.array(json.dumps({"crop_size": 224})))
    return [
        ("bzip2_member_bomb", c.zip_bytes([{"name": "archive/data.pkl", "data": mib, "method": 12, "declared_size": 4}]), ".pth"),
        ("deflate_member_lies_small", c.zip_bytes([{"name": "archive/data.pkl", "data": mib, "repeat": 100, "method": 8, "declared_size": 4}]), ".pth"),
        ("deflate_member_bomb", c.zip_bytes([{"name": "archive/data.pkl", "data": mib, "repeat": 100, "method": 8}]), ".pth"),
        ("deflate_member_bomb_under_cap", c.zip_bytes([{"name": "archive/data.pkl", "data": mib, "repeat": 40, "method": 8}]), ".pth"),
        ("encrypted_member", c.torch_zip(good_pkl, {"0": four}, flags=1), ".pth"),
        ("stored_member_claims_huge_compressed_size", c.torch_zip(good_pkl, {"0": four}, declared_compressed=0xF0000000), ".pth"),
        ("unknown_method", c.torch_zip(good_pkl, {"0": four}, method=99), ".pth"),
        ("unsupported_version", c.torch_zip(good_pkl, {"0": four}, version=999), ".pth"),
        ("bad_utf8_name", c.zip_bytes([{"name": b"archive/\xff\xfe.pkl", "data": b"x", "flags": 0x800}]), ".pth"),
        ("byteorder_bz2", c.zip_bytes([{"name": "archive/data.pkl", "data": good_pkl},
                                       {"name": "archive/byteorder", "data": b"little", "method": 12},
                                       {"name": "archive/data/0", "data": four}]), ".pth"),
        ("byteorder_garbage", c.zip_bytes([{"name": "archive/data.pkl", "data": good_pkl},
                                           {"name": "archive/byteorder", "data": b"\xff" * 100},
                                           {"name": "archive/data/0", "data": four}]), ".pth"),
        ("member_count_claim", _claim_members(c.torch_zip(good_pkl, {"0": four}), 60_000_000), ".pth"),
        ("npz_huge_shape", c.npz_bytes({"conv1.weight": c.npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,)}", b"\0" * 16)}), ".npz"),
        ("npz_object_dtype", c.npz_bytes({"conv1.weight": c.npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}", b"\0" * 8)}), ".npz"),
        ("npz_header_unterminated", c.npz_bytes({"a": c.npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)", b"\0" * 4)}), ".npz"),
        ("npz_header_overflow", c.npz_bytes({"a": c.npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "9" * 400 + ",)}", b"")}), ".npz"),
        ("npz_header_deep", c.npz_bytes({"a": c.npy_bytes("[" * 5000 + "]" * 5000, b"")}), ".npz"),
        ("npz_header_py2_long", c.npz_bytes({"a": c.npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1L,)}", b"\0" * 4)}), ".npz"),
        ("npz_deflate_bomb", c.zip_bytes([{"name": "a.npy", "data": mib, "repeat": 100, "method": 8}]), ".npz"),
        ("npz_deflate_bomb_lies_small", c.zip_bytes([{"name": "a.npy", "data": mib, "repeat": 100, "method": 8, "declared_size": 1000}]), ".npz"),
        ("npz_v3_header", c.npz_bytes({"a": c.npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", b"\0" * 4, version=3)}), ".npz"),
        ("npy_renamed_npz", c.npy_of(np.zeros(3, np.float32)), ".npz"),
        ("text_named_npz", b"these are my notes, not weights\n", ".npz"),
        ("empty_npz", b"", ".npz"),
        ("meta_crop_list", c.npz_bytes({"conv1.weight": c.npy_of(np.zeros((1, 3, 1, 1), np.float32))}, {"crop_size": [1]}), ".npz"),
        ("meta_crop_huge", c.npz_bytes({"conv1.weight": c.npy_of(np.zeros(1, np.float32))}, {"crop_size": 10**12}), ".npz"),
        ("meta_deep_json", c.npz_bytes({"a": c.npy_of(np.zeros(1))}, "[" * 100_000 + "]" * 100_000), ".npz"),
        ("meta_not_object", c.npz_bytes({"a": c.npy_of(np.zeros(1))}, "[1, 2]"), ".npz"),
        ("meta_classes_ints", c.npz_bytes({"a": c.npy_of(np.zeros(1))}, {"classes": [1, 2]}), ".npz"),
        ("meta_not_string", c.zip_bytes([{"name": "__meta__.npy", "data": c.npy_of(np.zeros(3))}]), ".npz"),
        ("npz_extra_member", c.zip_bytes([{"name": "a.npy", "data": npy_meta}, {"name": "README", "data": b"hi"}]), ".npz"),
        ("legacy_storage_claims_huge", c.legacy_pth(c.p_state_dict({"w": c.p_tensor("0", 4, 0, (4,), (1,))}), {"0": (1 << 60, four)}), ".pth"),
        ("legacy_storage_negative", c.legacy_pth(c.p_state_dict({"w": c.p_tensor("0", 4, 0, (4,), (1,))}), {"0": (-5, four)}), ".pth"),
    ]


def _claim_members(data: bytes, count: int) -> bytes:
    """The same archive, its end-of-directory record claiming `count` members (as a zip64 record would)."""
    at = data.rfind(b"PK\x05\x06")
    zip64 = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count, 0, 0)
    return data[:at] + zip64 + data[at:at + 8] + struct.pack("<HH", 0xFFFF, 0xFFFF) + data[at + 12:]


def _safetensors_cases() -> list[tuple[str, bytes]]:
    f32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731
    data = np.zeros(1 << 18, np.float32).tobytes()  # 1 MiB
    overlapping = {f"t{i}": f32([(1 << 18) - 64 * i], 256 * i, 1 << 20) for i in range(1000)}
    return [
        ("dtype_list", c.safetensors_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
        ("seventy_dims", c.safetensors_bytes({"a": f32([1] * 70, 0, 4)}, b"\0" * 4)),
        ("zero_size_huge", c.safetensors_bytes({"a": f32([0, 2**62, 2**62], 0, 0)}, b"")),
        ("deep_header", c.safetensors_bytes("[" * 100_000 + "]" * 100_000, b"")),
        ("metadata_nested", c.safetensors_bytes({"__metadata__": {"a": [[[1]]]}, "x": f32([1], 0, 4)}, b"\0" * 4)),
        ("aliases_one_range", c.safetensors_bytes({f"t{i}": f32([1 << 18], 0, 1 << 20) for i in range(3000)}, data)),
        ("overlapping_ranges", c.safetensors_bytes(overlapping, data)),
        ("zero_d_conv1", c.safetensors_bytes({k: f32([], 0, 4) for k in ("conv1.weight", "fc.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight")}, b"\0" * 4)),
        ("zero_channels", c.safetensors_bytes({"conv1.weight": f32([1, 3, 7, 7], 0, 588), "fc.weight": f32([1, 1], 0, 4),
                                               "layer1.0.conv1.weight": f32([0, 64, 1, 1], 0, 0), "layer1.0.conv2.weight": f32([0, 0, 3, 3], 0, 0),
                                               "layer1.0.conv3.weight": f32([1, 1, 1, 1], 0, 4)}, b"\0" * 588)),
        ("header_length_huge", struct.pack("<Q", 1 << 62) + b"{}"),
    ]


def _image_cases() -> list[tuple[str, bytes, str]]:
    import zlib

    def png(width, height, idat=b"", depth=8, color=0):
        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
                + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b""))

    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
           b"(pwned) print quit\n%%EOF\n")
    avif = io.BytesIO()
    try:
        Image.new("RGB", (16, 16)).save(avif, "AVIF")
        corrupt_avif = avif.getvalue()[: len(avif.getvalue()) - 40] + b"\0" * 40
    except (KeyError, OSError):
        corrupt_avif = b""
    bmp_huge = (b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 30000, -30000, 1, 24, 0, 0, 0, 0, 0, 0))
    gif_huge = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"," + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x08\x01\x00\x00;"
    cases = [
        ("eps_ghostscript", eps, ".eps"),
        ("eps_named_jpg", eps, ".jpg"),
        ("png_claims_8000x8000", png(8000, 8000, zlib.compress(b"\0" * 100)), ".png"),
        ("png_claims_16bit_9000x9000", png(9000, 9000, zlib.compress(b"\0" * 100), depth=16), ".png"),
        ("png_bomb_pixels", png(30000, 30000), ".png"),
        ("bmp_huge_negative_height", bmp_huge, ".bmp"),
        ("gif_huge_screen", gif_huge, ".gif"),
        ("tiff_garbage_ifd", b"II*\x00\x08\x00\x00\x00" + b"\xff\xff" + b"\x01" * 64, ".tiff"),
        ("webp_truncated", b"RIFF\x24\x00\x00\x00WEBPVP8L\x18\x00\x00\x00\x2f\xff\xff\xff\xff", ".webp"),
    ]
    if corrupt_avif:
        cases.append(("avif_corrupt", corrupt_avif, ".avif"))
    return cases


CAP = "past its cap"
NOT_READ = "not an image in a format npresnet reads"
BOMB = "decompression bomb"
# What each hostile case must give: the words of its refusal (a regex), or "read" where the file is
# legitimate after all (aliases are read once, not copied per alias).
EXPECT = {
    "deep_tuple_key": "nesting deeper than 32", "deep_list": "nesting deeper than 32",
    "shared_tuple_key": "more than 10000000 parts", "shared_tuple_top": "more than 10000000 parts",
    "shared_tuple_pid": "more than 10000000 parts", "shared_tuple_in_dict": "more than 10000000 parts",
    "colliding_int_keys": "only str and small int keys", "many_str_keys": "no state dict found|not a PyTorch checkpoint",
    "memo_index_huge": "memo index 4294967280 beyond", "memo_get_unset": "memo index 5 was never stored",
    "binbytes8_huge": "bytes of 1099511627776 bytes, but only", "bytearray8_huge": "bytes of 17179869184 bytes",
    "binunicode8_huge": "str of 8589934592 bytes", "long4_huge": "an integer of 1048576 bytes",
    "build_items_on_ordereddict": "BUILD on a odict", "build_on_global": "BUILD on a global",
    "global_os_system": "refused to unpickle global os.system", "ordereddict_with_pairs": "OrderedDict called with arguments",
    "setitems_on_tensor_args": r"SETITEM\(S\) on a tuple", "inst_opcode": "opcode b'i' is not used",
    "no_stop": "ends without STOP", "cycle": "or a cycle", "parameter_of_an_int": r"\.pth: a parameter's data is int",
    "stride0_4gb": CAP, "overlapping_views": CAP, "aliases_of_one_storage": "read", "size_overflow": CAP,
    "seventy_dims": "malformed (tensor metadata|shape)", "zero_size_huge_dims": "malformed tensor metadata",
    "storage_dtype_conflict": "used as both float32 and float64",
    "bzip2_member_bomb": "compression method 12", "deflate_member_lies_small": "Bad CRC-32",
    "deflate_member_bomb": "claims 104857600 bytes, more than", "deflate_member_bomb_under_cap": "is not used by checkpoints",
    "encrypted_member": "is encrypted", "stored_member_claims_huge_compressed_size": "not a readable zip|sizes differ", "unknown_method": "compression method 99",
    "unsupported_version": "not a readable zip archive", "bad_utf8_name": "not a readable zip archive",
    "byteorder_bz2": "compression method 12", "byteorder_garbage": "unknown byteorder",
    "member_count_claim": "60000000 members", "npz_huge_shape": "needs 4398046511104 bytes",
    "npz_object_dtype": "no objects", "npz_header_unterminated": "not a Python literal",
    "npz_header_overflow": "needs more than 2\\*\\*64 bytes", "npz_header_deep": "too long or truncated",
    "npz_header_py2_long": "not a Python literal", "npz_deflate_bomb": "claims 104857600 bytes",
    "npz_deflate_bomb_lies_small": "unreadable", "npz_v3_header": "read",
    "npy_renamed_npz": "an .npy array, not an .npz archive", "text_named_npz": "not a valid weights file: not a zip archive",
    "empty_npz": "not a zip archive", "meta_crop_list": "crop_size must be a positive integer",
    "meta_crop_huge": "crop_size must be a positive integer", "meta_deep_json": "not valid JSON",
    "meta_not_object": "must be a JSON object", "meta_classes_ints": "classes must be a list of class names",
    "meta_not_string": "must be one JSON string", "npz_extra_member": "is not an .npy array",
    "legacy_storage_claims_huge": "claims 1152921504606846976 float32 elements",
    "legacy_storage_negative": "claims -5 float32 elements",
    "dtype_list": "unsupported dtype a list", "zero_size_huge": "malformed shape", "deep_header": "not valid JSON",
    "metadata_nested": "__metadata__ is not a JSON object of strings", "aliases_one_range": "read",
    "overlapping_ranges": CAP, "zero_d_conv1": r"conv1.weight has shape \(\), expected 4 positive",
    "zero_channels": "expected 4 positive dimensions", "header_length_huge": "exceeds the file",
    "eps_ghostscript": NOT_READ, "eps_named_jpg": NOT_READ, "png_claims_8000x8000": "truncated",
    "png_claims_16bit_9000x9000": BOMB, "png_bomb_pixels": BOMB, "bmp_huge_negative_height": BOMB,
    "gif_huge_screen": BOMB, "tiff_garbage_ifd": f"{NOT_READ}|cannot read", "webp_truncated": f"{BOMB}|cannot read|truncated",
    "avif_corrupt": r"cannot read image \(RuntimeError",
}


def hostile() -> list[Case]:
    """The crafted cases of every class issue 10 lists, each as the format it attacks."""
    cases = []
    for name, pkl in _pickle_cases():
        cases.append(Case("hostile_pickle", f"{name}_zip", c.torch_zip(pkl, {}), ".pth", WEIGHTS, EXPECT[name]))
        cases.append(Case("hostile_pickle", f"{name}_legacy", pkl, ".pth", WEIGHTS, EXPECT[name]))
    for name, pkl, storages in _tensor_cases():
        cases.append(Case("hostile_tensor", f"{name}_zip", c.torch_zip(pkl, storages), ".pth", WEIGHTS, EXPECT[name]))
        legacy = {k: (len(v) // 4, v) for k, v in storages.items()}
        cases.append(Case("hostile_tensor", f"{name}_legacy", c.legacy_pth(pkl, legacy), ".pth", WEIGHTS, EXPECT[name]))
    for name, data, suffix in _archive_cases():
        cases.append(Case("hostile_archive", name, data, suffix, WEIGHTS, EXPECT[name]))
    for name, data in _safetensors_cases():
        cases.append(Case("hostile_safetensors", name, data, ".safetensors", WEIGHTS, EXPECT[name]))
    for name, data, suffix in _image_cases():
        cases.append(Case("hostile_image", name, data, suffix, IMAGE, EXPECT[name]))
    return cases
