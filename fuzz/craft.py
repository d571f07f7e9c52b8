"""Byte-level builders for hostile files: pickle opcodes, zip archives with any header field, .npy members.

Written from the formats' specifications (``pickletools``, PKWARE's APPNOTE.TXT, NumPy's
``format.py`` docstring), not from npresnet's readers, so that a file can lie in exactly one field.
"""
from __future__ import annotations

import bz2
import json
import struct
import zlib

import numpy as np

# --- pickle opcodes ---------------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MARK, STOP, TUPLE, EMPTY_TUPLE, EMPTY_DICT, EMPTY_LIST = b"(", b".", b"t", b")", b"}", b"]"
SETITEM, SETITEMS, APPEND, APPENDS, REDUCE, BUILD, NONE = b"s", b"u", b"a", b"e", b"R", b"b", b"N"
TUPLE1, TUPLE2, DUP, NEWFALSE, BINPERSID = b"\x85", b"\x86", b"2", b"\x89", b"Q"


def p_str(text: str) -> bytes:
    raw = text.encode()
    return (b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))) + raw


def p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def p_tuple(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


ORDERED_DICT = p_global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def p_storage(key: str, numel: int, storage: str = "FloatStorage") -> bytes:
    """A persistent id as torch's zip format writes it: ('storage', torch.FloatStorage, key, 'cpu', numel)."""
    return p_tuple(p_str("storage"), p_global("torch", storage), p_str(key), p_str("cpu"), p_int(numel)) + BINPERSID


def p_tensor(key: str, numel: int, offset: int, size: tuple, stride: tuple, storage: str = "FloatStorage") -> bytes:
    return (
        p_global("torch._utils", "_rebuild_tensor_v2")
        + p_tuple(p_storage(key, numel, storage), p_int(offset), p_tuple(*map(p_int, size)),
                  p_tuple(*map(p_int, stride)), NEWFALSE, ORDERED_DICT)
        + REDUCE
    )


def p_state_dict(entries: dict[str, bytes]) -> bytes:
    """An OrderedDict pickle of name -> (already pickled) value."""
    body = b"".join(p_str(k) + v for k, v in entries.items())
    return PROTO2 + ORDERED_DICT + MARK + body + SETITEMS + STOP


# --- zip archives -----------------------------------------------------------------------------------


def zip_bytes(members: list[dict]) -> bytes:
    """A zip archive. Each member: name (str or bytes), data (uncompressed bytes), and optionally
    repeat (the data that many times), method (0 stored, 8 deflated, 12 bzip2, anything else: data kept as is),
    flags, declared_size, declared_compressed, crc, version."""
    out, central = b"", b""
    for m in members:
        name = m["name"].encode() if isinstance(m["name"], str) else m["name"]
        data, repeat = m["data"], m.get("repeat", 1)  # data * repeat, never built in memory: bombs stay cheap
        method = m.get("method", 0)
        crc = 0
        for _ in range(repeat):
            crc = zlib.crc32(data, crc)
        if method == 8:
            # A full flush makes the block self-contained, so that repeating it is a valid stream; then an empty final block.
            packer = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed = (packer.compress(data) + packer.flush(zlib.Z_FULL_FLUSH)) * repeat + b"\x03\x00"
        elif method == 12:
            packed = bz2.compress(data * repeat)
        else:
            packed = data * repeat
        crc = m.get("crc", crc)
        size = m.get("declared_size", len(data) * repeat)
        flags, version = m.get("flags", 0), m.get("version", 20)
        compressed = m.get("declared_compressed", len(packed))
        fields = struct.pack("<HHHHHIII", version, flags, method, 0, 0x21, crc, compressed, size)
        offset = len(out)
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + packed
        central += (b"PK\x01\x02" + struct.pack("<H", version) + fields
                    + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name)
    count = len(members)
    return out + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, len(central), len(out), 0)


def torch_zip(data_pkl: bytes, storages: dict[str, bytes], **member_options) -> bytes:
    """A zip checkpoint laid out as torch.save writes one."""
    members = [{"name": "archive/data.pkl", "data": data_pkl, **member_options}, {"name": "archive/byteorder", "data": b"little"}]
    members += [{"name": f"archive/data/{k}", "data": v} for k, v in storages.items()]
    return zip_bytes(members)


def legacy_pth(obj_pkl: bytes, storages: dict[str, tuple[int, bytes]]) -> bytes:
    """The legacy format: magic, protocol, sys info, the object, the key list, then (numel, bytes) per storage."""
    head = (PROTO2 + p_int(0x1950A86A20F9469CFC6C) + STOP + PROTO2 + p_int(1001) + STOP
            + PROTO2 + EMPTY_DICT + p_str("little_endian") + b"\x88" + SETITEM + STOP)
    keys = PROTO2 + MARK + b"".join(p_str(k) for k in storages) + b"l" + STOP
    return head + obj_pkl + keys + b"".join(struct.pack("<q", n) + data for n, data in storages.values())


# --- .npy / .npz ------------------------------------------------------------------------------------


def npy_bytes(header: str, data: bytes, version: int = 1) -> bytes:
    raw = header.encode("latin1")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    length = struct.pack("<H", len(raw)) if version == 1 else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes([version, 0]) + length + raw + data


def npy_of(array: np.ndarray) -> bytes:
    header = {"descr": array.dtype.str, "fortran_order": False, "shape": array.shape}
    return npy_bytes(repr(header), np.ascontiguousarray(array).tobytes())


def npz_bytes(arrays: dict[str, bytes], meta: dict | str | None = None, method: int = 0) -> bytes:
    """An .npz of already-made .npy members, plus __meta__ (a JSON object, or a raw string)."""
    members = dict(arrays)
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        members["__meta__"] = npy_of(np.array(text))
    return zip_bytes([{"name": f"{k}.npy", "data": v, "method": method} for k, v in members.items()])


# --- .safetensors -----------------------------------------------------------------------------------


def safetensors_bytes(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data
