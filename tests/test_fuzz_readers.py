"""Fuzzing every reader of an outside file: whatever a file holds, only ``MegavodError`` comes out.

Each reader gets seeded mutations (numpy ``Generator``s with fixed seeds: every run sees the same cases) of
valid files that megavod itself writes: cuts at many offsets, bit flips in headers and elsewhere, random
bytes, wrong JSON / YAML / XML shapes (lists for mappings, wrong types, missing keys, huge numbers), wrong
pickle contents (``torch.save`` of non-dicts, dicts of non-tensors, nested junk). A case passes when the
reader succeeds (some mutations keep a file valid) or raises a one-line ``MegavodError`` naming the file;
readers that write (``convert``, ``detect``, ``postprocess``) must leave no output file behind when they
fail. Every problem is collected with its case, so one run shows them all; ``-s`` prints the number of
cases per reader.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import struct
import zlib
import xml.etree.ElementTree as ET
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from megavod.apps.cli import main as cli_main
from megavod.checkpoint_files import read_checkpoint, read_detectron_pickle, read_weights, sidecar_path
from megavod.checkpoints.loading import resolve_config
from megavod.config import dump_config, load_config, to_dict
from megavod.data.coco_vid import CocoVidVideo, read_coco_vid, write_coco_vid
from megavod.data.image_sets import ImageSetEntry, read_image_set, write_image_set
from megavod.data.predictions import FramePrediction, VideoPredictions, read_predictions, write_predictions
from megavod.data.vid_xml import read_annotation, write_annotation
from megavod.data.video import RandomAccessFrames, open_source, write_video
from megavod.errors import MegavodError
from megavod.methods import build_detector
from megavod.methods.convert import convert
from megavod.models.backbone import build_backbone, load_pretrained_resnet
from megavod.structures import Detections, FrameAnnotation

from reference_data import authors_listing

# Damaged files make torch and PIL warn on their way to the error (odd pickle protocols, corrupt EXIF).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# A model of a few thousand weights: synthetic_single with narrow channels (convert builds it per case).
TINY_MODEL = ["model.backbone.small_stem_channels=8", "model.roi_head.reduced_channels=8",
              "model.roi_head.representation_size=16"]
# ``megavod detect`` on a randomly initialised tiny detector.
DETECT = ["--config", "synthetic_single", "input.min_size_test=48", "input.max_size_test=64",
          "model.rpn.post_nms_top_n_test=30", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# Running cases


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


@dataclass
class Tally:
    """The cases of one reader: how many were read, refused (MegavodError), and what went wrong."""

    reader: str
    cases: int = 0
    read: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)

    def case(self, label: str, names: Iterable[str], call: Callable[[], object],
             left_behind: Callable[[bool], list[str]] | None = None) -> None:
        """Run ``call``: it must return, or raise a one-line ``MegavodError`` naming one of ``names``;
        ``left_behind(failed)`` lists output files that should not exist."""
        self.cases += 1
        names = list(names)
        failed = True
        try:
            call()
            failed = False
            self.read += 1
        except MegavodError as e:
            self.refused += 1
            message = str(e)
            if "\n" in message:
                self.problems.append(f"{label}: the message spans lines: {message[:200]!r}")
            if not any(n in message for n in names):
                self.problems.append(f"{label}: the message does not name {' or '.join(names)}: {message[:200]}")
        except Exception as e:  # noqa: BLE001 - a leaked exception is what this module looks for
            self.problems.append(f"{label}: {type(e).__name__} leaked: {_first_line(e)}")
        if left_behind is not None:
            self.problems += [f"{label}: left behind {p}" for p in left_behind(failed)]

    def summary(self) -> str:
        return (f"{self.reader}: {self.cases} cases ({self.read} read, {self.refused} refused), "
                f"{len(self.problems)} problems")

    def check(self, minimum: int) -> None:
        assert self.cases >= minimum, f"{self.reader}: only {self.cases} cases"
        if self.problems:
            kinds = Counter(m.group(1) for p in self.problems if (m := re.search(r": (\w+) leaked", p)))
            raise AssertionError(f"{self.reader}: {len(self.problems)} of {self.cases} cases failed "
                                 f"(leaked: {dict(kinds)}):\n" + "\n".join(self.problems[:40]))


class Cases:
    """Numbered case files in one folder, so that each message must name its own file."""

    def __init__(self, folder: Path, suffix: str) -> None:
        self.folder, self.suffix, self.n = folder, suffix, 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes, suffix: str | None = None) -> Path:
        self.n += 1
        path = self.folder / f"case{self.n:03d}{self.suffix if suffix is None else suffix}"
        path.write_bytes(data)
        return path


# ----------------------------------------------------------------------------------------------
# Mutations


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def byte_mutations(data: bytes, seed: int, *, cuts: int = 8, header: int = 64, header_flips: int = 8,
                   flips: int = 6) -> list[tuple[str, bytes]]:
    """Cuts (fixed offsets plus ``cuts`` random ones), bit flips in the first ``header`` bytes and
    anywhere, overwritten runs, random bytes, zeros, short text."""
    rng = np.random.default_rng(seed)
    n = len(data)
    offsets = {1, 2, 3, 4, 8, 9, 16, 40, n // 3, n // 2, n - 1, *rng.integers(1, n, cuts).tolist()}
    out = [(f"cut at {o}", data[:o]) for o in sorted(o for o in offsets if 0 < o < n)]
    for pos in rng.integers(0, min(header, n), header_flips).tolist():
        bit = int(rng.integers(8))
        out.append((f"header bit flip at {pos}.{bit}", _flip(data, pos, bit)))
    for pos in rng.integers(0, n, flips).tolist():
        bit = int(rng.integers(8))
        out.append((f"bit flip at {pos}.{bit}", _flip(data, pos, bit)))
    for _ in range(2):
        pos = int(rng.integers(0, n))
        out.append((f"16 random bytes at {pos}", data[:pos] + rng.bytes(16) + data[pos + 16:]))
    out += [
        ("random bytes", rng.bytes(n)),
        ("random short file", rng.bytes(int(rng.integers(1, 24)))),
        ("zeros", bytes(n)),
        ("short text", b"hello\n"),
        ("one character", b"a"),
        ("first half + random", data[: n // 2] + rng.bytes(n // 4)),
    ]
    return out


JUNK = (None, True, 0, -1, 3, 2**63, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308, float("nan"), float("inf"),
        "", "x", "n02391049", "../../etc", [], {}, [1, 2, 3, 4], [[1, 2, 3, 4]], {"a": 1}, [[[[]]]], [None],
        ["a", "b"], {"": None})


def _nodes(doc, path=()):
    yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _nodes(value, path + (key,))


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _where(path) -> str:
    return "/".join(map(str, path)) or "<top>"


def tree_mutations(doc, seed: int, n: int) -> list[tuple[str, object]]:
    """``n`` copies of a JSON-like ``doc`` with one node changed: replaced by junk of another type,
    deleted, wrapped in a list, replaced by its first child, a mapping turned into a list (and back),
    a key added, a list item duplicated, a value turned into a string."""
    rng = np.random.default_rng(seed)
    paths = list(_nodes(doc))
    ops = ("junk", "junk", "junk", "delete", "delete", "wrap", "unwrap", "retype", "add", "dup", "stringify")
    out = []
    while len(out) < n:
        path = paths[int(rng.integers(len(paths)))]
        op = ops[int(rng.integers(len(ops)))]
        new = copy.deepcopy(doc)
        node = _get(new, path)
        if op == "junk":
            value = JUNK[int(rng.integers(len(JUNK)))]
        elif op == "delete":
            if not path:
                continue
            del _get(new, path[:-1])[path[-1]]
            out.append((f"delete {_where(path)}", new))
            continue
        elif op == "wrap":
            value = [node]
        elif op == "unwrap":
            items = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
            if not items:
                continue
            value = items[0]
        elif op == "retype":
            if isinstance(node, dict):
                value = list(node.values())
            elif isinstance(node, list):
                value = {str(i): v for i, v in enumerate(node)}
            else:
                continue
        elif op == "add":
            if not isinstance(node, dict):
                continue
            node["zz_extra"] = JUNK[int(rng.integers(len(JUNK)))]
            value = node
        elif op == "dup":
            if not isinstance(node, list) or not node:
                continue
            node.append(copy.deepcopy(node[-1]))
            value = node
        else:  # stringify
            value = json.dumps(node) if isinstance(node, (dict, list)) else str(node)
        if path:
            _get(new, path[:-1])[path[-1]] = value
        else:
            new = value
        out.append((f"{op} {_where(path)}", new))
    return out


# Text that breaks parsers in other ways than shape: nesting, number limits, encodings, YAML's types.
SPECIAL_JSON = [
    ("deep nesting", b"[" * 100_000),
    ("deep objects", b'{"a":' * 50_000),
    ("5000-digit number", b'{"videos": [' + b"9" * 5000 + b"]}"),
    ("NaN top level", b"NaN"),
    ("UTF-8 BOM", b"\xef\xbb\xbf{}"),
    ("UTF-16", '{"videos": []}'.encode("utf-16")),
    ("latin-1", '{"vidéos": []}'.encode("latin-1")),
    ("lone surrogate", b'{"x": "\\ud800"}'),
    ("empty", b""),
    ("null", b"null"),
    ("list", b"[]"),
    ("string", b'"x"'),
    ("NUL bytes", b"\x00" * 10),
]
SPECIAL_YAML = [
    ("impossible date", b"solver: 2020-13-45\n"),
    ("impossible timestamp", b"a: 2020-02-30 25:00:00\n"),
    ("bad !!int", b"mega: {T_l: !!int abc}\n"),
    ("bad !!float", b"a: !!float x\n"),
    ("bad !!timestamp", b"a: !!timestamp foo\n"),
    ("bad !!binary", b"a: !!binary xx!\n"),
    ("python tag", b"a: !!python/object/apply:os.system [echo hi]\n"),
    ("unhashable key", b"? [1, 2]\n: 3\n"),
    ("deep nesting", b"[" * 5000),
    ("recursive alias", b"model: &a {backbone: *a}\n"),
    ("recursive list", b"&a [*a]\n"),
    ("non-UTF-8", b"name: caf\xe9\n"),
    ("UTF-16", "mega: {T_l: 3}\n".encode("utf-16")),
    ("NUL byte", b"mega: {T_l: 3}\x00\n"),
    ("tab indentation", b"mega:\n\tT_l: 3\n"),
    ("list", b"- 1\n- 2\n"),
    ("scalar", b"5\n"),
    ("string", b"hello\n"),
    ("empty", b""),
    ("document separators", b"---\na: 1\n---\nb: 2\n"),
    ("5000-digit int", b"mega: {T_l: " + b"9" * 5000 + b"}\n"),
    ("huge float", b"mega: {distill_ratio: 1e999}\n"),
    ("long key", b"m" * 5000 + b": 1\n"),
    ("long base", b"_base_: " + b"a" * 5000 + b"\n"),
    ("long base path", b"_base_: /" + b"a/" * 3000 + b"x.yaml\n"),
    ("base with NUL", b'_base_: "a\\0b"\n'),
    ("base is a list", b"_base_: [synthetic_single]\n"),
    ("base is a mapping", b"_base_: {a: 1}\n"),
    ("base is a number", b"_base_: 5\n"),
    ("base is empty", b"_base_: ''\n"),
    ("base is null", b"_base_: null\n"),
    ("base is a folder", b"_base_: /\n"),
    ("base does not exist", b"_base_: /nonexistent/x.yaml\n"),
    ("weights path too long", b"model: {init_weights: " + b"w" * 5000 + b"}\n"),
    ("weights path with NUL", b'model: {init_weights: "a\\0b"}\n'),
]


# ----------------------------------------------------------------------------------------------
# Valid files, written by megavod (once per module)


@dataclass
class Sources:
    root: Path
    tiny_cfg: object
    tiny_state: dict
    clip: Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    root = tmp_path_factory.mktemp("fuzz_sources")
    tiny_cfg = load_config("synthetic_single", TINY_MODEL)
    torch.manual_seed(0)
    state = build_detector(tiny_cfg).state_dict()
    rng = np.random.default_rng(0)
    clip = root / "clip.mp4"
    write_video(clip, (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)), fps=10)
    return Sources(root, tiny_cfg, state, clip)


def _small_tensors() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.arange(6.0).reshape(2, 3), "backbone.b": torch.zeros(2, dtype=torch.float16),
            "steps": torch.tensor([1, 2], dtype=torch.int64)}


def _expanded(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes that cost one element each (saved with stride 0)."""
    one = torch.zeros(1)
    return {k: one.reshape((1,) * len(s)).expand(s) if s else torch.zeros(()) for k, s in shapes.items()}


def _video_predictions() -> list[VideoPredictions]:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 2, generator=g) * 50
    d = Detections(torch.cat([xy, xy + 10], 1), torch.rand(3, generator=g), torch.tensor([1, 5, 30]))
    return [VideoPredictions("val/v0", 64, 48, [FramePrediction(0, "000000.JPEG", d),
                                                FramePrediction(1, None, Detections.empty())]),
            VideoPredictions("val/v1", 32, 32, [])]


def _annotation(video: str, frame: int, track_ids=(0, 1)) -> FrameAnnotation:
    return FrameAnnotation(
        video=video, frame=frame, width=64, height=48,
        boxes=torch.tensor([[1.0, 2.0, 20.0, 30.0], [10.0, 5.0, 60.0, 40.0]]),
        labels=torch.tensor([30, 17]), track_ids=torch.tensor(list(track_ids)),
        occluded=torch.tensor([False, True]), generated=torch.tensor([False, False]),
    )


# ----------------------------------------------------------------------------------------------
# The readers. Each takes (sources, a fresh folder, capsys) and returns its Tally.


def fuzz_pth(src: Sources, tmp: Path, capsys) -> Tally:
    """read_checkpoint / read_weights of torch files: bytes, short texts, wrong pickle contents."""
    t = Tally("read_weights .pth")
    cases = Cases(tmp, ".pth")
    valid = tmp / "valid.pth"
    torch.save({"model": _small_tensors(), "iteration": 3}, valid)
    legacy = tmp / "legacy.pth"
    pool = torch.arange(8.0)  # one storage: the legacy format orders several by memory address
    torch.save({"model": {"backbone.w": pool[:6].view(2, 3), "backbone.b": pool[6:]}}, legacy,
               _use_new_zipfile_serialization=False)
    legacy.write_bytes(_fixed_storage_keys(legacy.read_bytes()))
    assert torch.equal(read_weights(legacy).state_dict["backbone.b"], pool[6:])
    blobs = byte_mutations(valid.read_bytes(), 1, cuts=12, header=128, header_flips=12, flips=12)
    blobs += byte_mutations(legacy.read_bytes(), 2, header=256)
    texts = [b"a", b"ab", b".", b"hello", b"x y z", b"0", b"(", b"]", b"}", b"N.", b"I1\n.", b"PK",
             b"PK\x03\x04 not a zip", b"\x80\x02", b"\x80\x02}q\x00.", b"\x80\x04K\x01.", b"# weights\n",
             b'{"model": {}}', b"\x00", b"\n" * 100, pickle.dumps({"model": {"a": 1}}), pickle.dumps([1, 2])]
    blobs += [(f"text {text[:12]!r}", text) for text in texts]
    for label, data in blobs:
        path = cases.write(data)
        t.case(label, [path.name], lambda p=path: read_weights(p))
        t.case(label + " (read_checkpoint)", [path.name], lambda p=path: read_checkpoint(p))

    small = _small_tensors()
    contents = {
        "list": [small["backbone.w"]], "int": 5, "string": "weights", "None": None, "a tensor": small["backbone.w"],
        "empty dict": {}, "model is an int": {"model": 3}, "empty model": {"model": {}},
        "dict of ints": {"a": 1, "b": 2}, "dict of strings": {"a": "x"}, "int keys": {1: small["backbone.w"]},
        "tuple keys": {(1, 2): small["backbone.w"]}, "None key": {None: small["backbone.w"]},
        "lists of tensors": {"a": [small["backbone.w"]]}, "nested dicts": {"a": {"b": {"c": small["backbone.w"]}}},
        "nested junk": {"model": {"a": small["backbone.w"], "b": [1, {"c": None}]}},
        "state_dict of junk": {"state_dict": {"a": 1}}, "model list": {"model": [small["backbone.w"]]},
        "megavod format, config a list": {"format": "megavod", "model": small, "config": [1, 2]},
        "megavod format, config a string": {"format": "megavod", "model": small, "config": "single"},
        "format an int": {"format": 5, "model": small}, "format a dict": {"format": {"a": 1}, "model": small},
        "ordered dict": OrderedDict(small), "module prefix": {f"module.{k}": v for k, v in small.items()},
        "only module.": {"module.": small["backbone.w"]},
        "sparse tensor": {"a": small["backbone.w"].to_sparse()},
        "complex tensor": {"a": torch.zeros(2, dtype=torch.complex64)},
        "bool tensor": {"a": torch.zeros(2, dtype=torch.bool)},
        "0-d tensor": {"a": torch.tensor(1.0)}, "empty tensor": {"a": torch.zeros(0, 3)},
        "expanded tensor": {"a": torch.zeros(1).expand(10**6)},
        "parameter": {"a": torch.nn.Parameter(torch.ones(2))}, "meta tensor": {"a": torch.empty(2, device="meta")},
        "set": {1, 2}, "tuple": (small["backbone.w"],), "bytes": b"\x00\x01", "float": 1.5,
        "deeply nested": {"model": [[[[[[[[[[small["backbone.w"]]]]]]]]]]]},
    }
    for label, obj in contents.items():
        path = cases.folder / f"content{cases.n:03d}.pth"
        cases.n += 1
        torch.save(obj, path)
        t.case(f"torch.save({label})", [path.name], lambda p=path: read_weights(p))
    return t


def _fixed_storage_keys(data: bytes) -> bytes:
    """The legacy torch format names storages by memory address: the same digits on every run instead."""
    for i, key in enumerate(dict.fromkeys(re.findall(rb"\d{10,}", data))):  # in order of appearance
        data = data.replace(key, str(10 ** (len(key) - 1) + i).encode())
    return data


def _safetensors(header: dict | bytes, payload: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


def _safetensors_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """What ``save_file`` writes, in a fixed layout: safetensors orders the metadata by a hash seeded per
    process, and byte mutations need the same bytes on every run."""
    dtypes = {torch.int64: "I64", torch.float32: "F32", torch.float16: "F16"}
    header: dict = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):  # aligned, widest first
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def fuzz_safetensors(src: Sources, tmp: Path, capsys) -> Tally:
    """read_weights of safetensors files: bytes, headers, the recorded YAML, the sidecar."""
    t = Tally("read_weights .safetensors")
    cases = Cases(tmp, ".safetensors")
    valid = tmp / "valid.safetensors"
    valid.write_bytes(_safetensors_file(_small_tensors(), {"format": "megavod", "config": dump_config(src.tiny_cfg)}))
    read = read_weights(valid)  # the layout is one safetensors reads
    assert read.config is not None and all(torch.equal(read.state_dict[k], v) for k, v in _small_tensors().items())
    data = valid.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    blobs = byte_mutations(data, 3, cuts=12, header=header_len + 8, header_flips=40, flips=8)
    payload = struct.pack("<6f", *range(6))
    w = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    headers = [
        ("valid header", {"w": w}),
        *[(f"dtype {d!r}", {"w": {**w, "dtype": d}}) for d in ("F33", "f32", 5, None, "BOOL", "U64", "C64", "F8_E5M2", "I4")],
        *[(f"shape {s!r}", {"w": {**w, "shape": s}}) for s in ([-1, 3], [2, 3.5], "x", [2**40, 2**40], [], [0], [3, 3], None)],
        *[(f"offsets {o!r}", {"w": {**w, "data_offsets": o}}) for o in ([24, 0], [0, 10**12], [0], "x", [-1, 24], [0, 23])],
        ("tensor entry a list", {"w": [1, 2]}), ("tensor entry missing keys", {"w": {}}),
        ("two tensors overlapping", {"w": w, "v": w}), ("no tensors", {}),
        *[(f"metadata {m!r}", {"w": w, "__metadata__": m}) for m in ({"config": 5}, [], "x", {"config": None})],
        ("header a list", b"[]"), ("header cut", b"{"), ("header null", b"null"), ("header not UTF-8", b"\xff\xfe"),
    ]
    blobs += [(label, _safetensors(h, payload)) for label, h in headers]
    blobs += [(f"header length {n}", _safetensors({"w": w}, payload, n)) for n in (0, 1, 2**63, 2**64 - 1, 10_000)]
    for text_label, text in SPECIAL_YAML:
        meta = {"w": w, "__metadata__": {"format": "megavod", "config": text.decode("utf-8", "replace")}}
        blobs.append((f"config {text_label}", _safetensors(meta, payload)))
    for label, blob in blobs:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_weights(p))
    # The same safetensors content under a name that does not say so (recognised by its header).
    for label, blob in byte_mutations(data, 4, header=header_len + 8, cuts=4, header_flips=6, flips=2)[:12]:
        path = cases.write(blob, ".bin")
        t.case(label + " (.bin)", [path.name], lambda p=path: read_weights(p))
    # The sidecar FILE.yaml: the config when the metadata has none.
    bare = tmp / "bare.safetensors"
    save_file(_small_tensors(), bare, metadata={"format": "megavod"})
    sidecars = [(label, text) for label, text in SPECIAL_YAML]
    sidecars += [(label, text[: len(text) // 2]) for label, text in byte_mutations(
        dump_config(src.tiny_cfg).encode(), 5, cuts=3, header=200, header_flips=4, flips=4)[:12]]
    for label, text in sidecars:
        path = cases.write(bare.read_bytes())
        sidecar_path(path).write_bytes(text)
        t.case(f"sidecar {label}", [path.name], lambda p=path: read_weights(p))
    return t


def fuzz_recorded_config(src: Sources, tmp: Path, capsys) -> Tally:
    """The config a megavod file records (config_from_record via resolve_config), in safetensors
    metadata and in a torch file's ``config`` field."""
    t = Tally("recorded config")
    cases = Cases(tmp, ".safetensors")
    record = to_dict(src.tiny_cfg)
    tensors = _small_tensors()
    for i, (label, mutated) in enumerate(tree_mutations(record, 6, 70)):
        if i % 2:
            path = cases.folder / f"case{cases.n:03d}.pth"
            cases.n += 1
            torch.save({"format": "megavod", "model": tensors, "config": mutated}, path)
        else:
            try:
                text = yaml.safe_dump(mutated, sort_keys=False)
            except yaml.YAMLError:
                continue
            path = cases.folder / f"case{cases.n:03d}.safetensors"
            cases.n += 1
            save_file(tensors, path, metadata={"format": "megavod", "config": text})
        t.case(label, [path.name], lambda p=path: resolve_config(read_weights(p)))
    for label, text in SPECIAL_YAML:
        path = tmp / f"special{cases.n:03d}.safetensors"
        cases.n += 1
        save_file(tensors, path, metadata={"format": "megavod", "config": text.decode("utf-8", "replace")})
        t.case(f"YAML {label}", [path.name], lambda p=path: resolve_config(read_weights(p)))
    return t


def fuzz_recognise(src: Sources, tmp: Path, capsys) -> Tally:
    """Files without a recorded config: the method and preset are read from key names and shapes
    (recognise, config_for). Real listings with junk shapes, names and values."""
    t = Tally("state dict keys (recognise)")
    rng = np.random.default_rng(7)
    listings = [authors_listing(n)[2] for n in ("vid_R_50_C4_1x", "vid_R_50_C4_MEGA_1x", "vid_R_101_C4_RDN_1x",
                                       "vid_R_50_C4_FGFA_1x", "vid_R_101_C4_DFF_1x")]
    shape_junk = [(), (0,), (1,), (3, 0), (0, 0, 3, 3), (64, 0, 3, 3), (7,), (2, 2, 2, 2, 2), (10**6,)]
    important = ["backbone.body.stem.conv1.weight", "roi_heads.box.predictor.cls_score.weight",
                 "backbone.body.layer1.0.conv2.weight", "roi_heads.box.feature_extractor.conv.weight"]
    n = 0
    for shapes in listings:
        keys = list(shapes)
        variants: list[tuple[str, dict]] = [("unchanged", dict(shapes))]
        for key in important + [keys[int(i)] for i in rng.integers(0, len(keys), 4)]:
            junk = shape_junk[int(rng.integers(len(shape_junk)))]
            variants.append((f"{key} shape {junk}", {**shapes, key: junk}))
        drop = [keys[int(i)] for i in rng.integers(0, len(keys), 3)]
        variants.append((f"without {drop}", {k: s for k, s in shapes.items() if k not in drop}))
        variants.append(("keys renamed", {k.replace("layer", "lyr"): s for k, s in shapes.items()}))
        for label, variant in variants:
            n += 1
            path = tmp / f"case{n:03d}.pth"
            torch.save(_expanded(variant), path)
            t.case(label, [path.name], lambda p=path: resolve_config(read_weights(p)))
    small = {k: v for k, v in _expanded(listings[0]).items()}
    odd_values = {"int keys": {1: torch.zeros(1), **small}, "a string value": {**small, "x": "y"},
                  "integer stem": {**small, "backbone.body.stem.conv1.weight": torch.zeros(64, 3, 7, 7, dtype=torch.int8)}}
    for label, obj in odd_values.items():
        n += 1
        path = tmp / f"case{n:03d}.pth"
        torch.save(obj, path)
        t.case(label, [path.name], lambda p=path: resolve_config(read_weights(p)))
    return t


def fuzz_detectron_pickle(src: Sources, tmp: Path, capsys) -> Tally:
    """read_detectron_pickle of Detectron C2 weight pickles (.pkl)."""
    t = Tally("read_detectron_pickle")
    cases = Cases(tmp, ".pkl")
    blobs = {"conv1_w": np.ones((4, 3, 3, 3), np.float32), "res_conv1_bn_s": np.arange(4, dtype=np.float32)}
    data = pickle.dumps({"blobs": blobs}, protocol=2)
    mutated = byte_mutations(data, 8, cuts=12, header=len(data), header_flips=20, flips=0)
    for protocol in (0, 4, 5):
        mutated += byte_mutations(pickle.dumps({"blobs": blobs}, protocol=protocol), 9 + protocol,
                                  cuts=4, header_flips=6, flips=2)[:10]
    contents = {
        "a list": [1, 2], "blobs a list": {"blobs": [1]}, "blob a string": {"blobs": {"conv1_w": "x"}},
        "int keys": {"blobs": {1: np.ones(2)}}, "blob None": {"blobs": {"conv1_w": None}},
        "object array": {"blobs": {"conv1_w": np.array([1, "a"], dtype=object)}},
        "string array": {"blobs": {"conv1_w": np.array(["a", "b"])}},
        "nested": {"blobs": {"conv1_w": {"a": np.ones(2)}}}, "bare blobs": blobs, "empty": {},
        "ordered dict": OrderedDict(blobs=OrderedDict(blobs)), "a number": 5, "bytes keys": {b"blobs": blobs},
        "complex array": {"blobs": {"conv1_w": np.ones(2, np.complex64)}},
        "structured array": {"blobs": {"conv1_w": np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])}},
    }
    mutated += [(f"pickle of {label}", pickle.dumps(obj, protocol=2)) for label, obj in contents.items()]
    for label, blob in mutated:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_detectron_pickle(p))
    return t


def fuzz_backbone_weights(src: Sources, tmp: Path, capsys) -> Tally:
    """load_pretrained_resnet: ImageNet weights (model.backbone.weights) as a torch file or a C2 pickle."""
    t = Tally("pretrained backbone weights")
    body = build_backbone(src.tiny_cfg.model.backbone).body
    state = {f"backbone.body.{k}": v for k, v in body.state_dict().items()}
    valid = tmp / "valid.pth"
    torch.save(state, valid)
    first = next(iter(state))
    variants: list[tuple[str, bytes | object, str]] = [
        (label, blob, ".pth") for label, blob in byte_mutations(valid.read_bytes(), 16, cuts=6, header=128, header_flips=6, flips=6)]
    variants += [
        ("unchanged", state, ".pth"), ("a list", list(state.values()), ".pth"), ("int keys", {1: state[first]}, ".pth"),
        ("string values", {k: "x" for k in state}, ".pth"), ("another shape", {**state, first: torch.zeros(3)}, ".pth"),
        ("an integer tensor", {**state, first: state[first].to(torch.int32)}, ".pth"),
        ("a sparse tensor", {**state, first: state[first].to_sparse()}, ".pth"),
        ("a meta tensor", {**state, first: torch.empty(state[first].shape, device="meta")}, ".pth"),
        ("a complex tensor", {**state, first: state[first].to(torch.complex64)}, ".pth"),
        ("a missing tensor", {k: v for k, v in state.items() if k != first}, ".pth"),
        ("wrapped in model", {"model": state}, ".pth"),
        ("C2 pickle with one blob", pickle.dumps({"blobs": {"conv1_w": np.ones((8, 3, 7, 7), np.float32)}}), ".pkl"),
        ("C2 pickle, blob of strings", pickle.dumps({"blobs": {"conv1_w": np.array(["a"] * 4)}}), ".pkl"),
        ("C2 pickle of a list", pickle.dumps([1, 2]), ".pkl"),
    ]
    pkl = pickle.dumps({"blobs": {"conv1_w": np.ones((8, 3, 7, 7), np.float32)}}, protocol=2)
    variants += [(f"C2 pickle {label}", blob, ".pkl") for label, blob in byte_mutations(pkl, 17, cuts=4, header_flips=4, flips=2)]
    for i, (label, content, suffix) in enumerate(variants):
        path = tmp / f"case{i:03d}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        t.case(label, [path.name], lambda p=path: load_pretrained_resnet(p, build_backbone(src.tiny_cfg.model.backbone).body))
    return t


def fuzz_convert(src: Sources, tmp: Path, capsys) -> Tally:
    """megavod.methods.convert.convert: reads, then writes; nothing may be left behind on failure."""
    t = Tally("convert (writes)")
    cfg_record = to_dict(src.tiny_cfg)
    valid = {"format": "megavod", "version": 1, "model": src.tiny_state, "config": cfg_record}
    good = tmp / "valid.pth"
    torch.save(valid, good)
    data = good.read_bytes()
    inputs: list[tuple[str, bytes | dict]] = byte_mutations(data, 10, cuts=6, header=128, header_flips=6, flips=6)
    state = dict(src.tiny_state)
    keys = list(state)
    rng = np.random.default_rng(11)
    first, last = keys[0], keys[-1]
    inputs += [
        ("a tensor of another shape", {**valid, "model": {**state, first: torch.zeros(3)}}),
        ("an integer tensor", {**valid, "model": {**state, last: state[last].to(torch.int32)}}),
        ("a missing tensor", {**valid, "model": {k: v for k, v in state.items() if k != first}}),
        ("an extra tensor", {**valid, "model": {**state, "extra.weight": torch.zeros(2)}}),
        ("NaN weights", {**valid, "model": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                             for k, v in state.items()}}),
        ("half precision", {**valid, "model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()}}),
        ("a sparse tensor", {**valid, "model": {**state, last: state[last].to_sparse()}}),
        ("a complex tensor", {**valid, "model": {**state, last: state[last].to(torch.complex64)}}),
        ("a 0-d tensor", {**valid, "model": {**state, last: torch.tensor(1.0)}}),
        ("model a list", {**valid, "model": list(state.values())}),
        ("no config", {"model": state}),
    ]
    inputs += [(f"config: {label}", {**valid, "config": c}) for label, c in tree_mutations(cfg_record, 12, 8)]
    for i, (label, content) in enumerate(inputs):
        path = tmp / f"case{i:03d}.pth"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        out = tmp / f"out{i:03d}"
        dst = out / ("converted.safetensors" if i % 2 else "converted.pth")

        def left_behind(failed: bool, out=out, dst=dst) -> list[str]:
            files = sorted(p.name for p in out.iterdir()) if out.exists() else []
            expected = [] if failed else sorted([dst.name] + ([sidecar_path(dst).name] if dst.suffix == ".safetensors" else []))
            return [] if files == expected else [f"{files} (expected {expected})"]

        t.case(label, [path.name], lambda p=path, d=dst: convert(p, d), left_behind)
        if rng.random() < 0.3 and dst.exists():
            t.case(label + " (converted file read back)", [dst.name], lambda d=dst: resolve_config(read_weights(d)))
    return t


def _video_blobs(src: Sources, seed: int, count: int) -> list[tuple[str, bytes, str]]:
    data = src.clip.read_bytes()
    blobs = [(label, blob, ".mp4") for label, blob in
             byte_mutations(data, seed, cuts=10, header=1500, header_flips=14, flips=10)]
    for suffix in (".avi", ".mkv"):
        other = src.root / f"clip{suffix}"
        if not other.exists():
            with open_source(src.clip) as frames:
                write_video(other, list(frames), fps=10)
        blobs += [(f"{label} ({suffix})", blob, suffix) for label, blob in
                  byte_mutations(other.read_bytes(), seed + 1, cuts=3, header=600, header_flips=5, flips=3)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(blobs))[:count]
    chosen = [blobs[int(i)] for i in sorted(order)]
    tag = data.find(b"Lavf")  # the encoder tag in the metadata, made invalid UTF-8
    if tag >= 0:
        chosen.append(("metadata not UTF-8", data[:tag] + b"\xff\xfe" + data[tag + 2:], ".mp4"))
    return chosen


def fuzz_video(src: Sources, tmp: Path, capsys) -> Tally:
    """open_source + decoding every frame of a video file (VideoSource)."""
    t = Tally("open_source / VideoSource")
    cases = Cases(tmp, ".mp4")

    def read(path: Path) -> None:
        with open_source(path) as source:
            frames = [frame.shape for frame in source]
            assert frames and all(s == frames[0] for s in frames), frames

    for label, blob, suffix in _video_blobs(src, 13, 80):
        path = cases.write(blob, suffix)
        t.case(label, [path.name], lambda p=path: read(p))
    for label, blob in [("text", b"this is not a video\n" * 20), ("ftyp only", src.clip.read_bytes()[:32])]:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read(p))
    return t


def fuzz_random_access(src: Sources, tmp: Path, capsys) -> Tally:
    """RandomAccessFrames over a video file and a frame folder (decoding, spilling, reading back)."""
    t = Tally("RandomAccessFrames")
    cases = Cases(tmp, ".mp4")

    def read(path: Path) -> None:
        with RandomAccessFrames(path, max_cached=1, spill_dir=tmp / "spill") as frames:
            n = len(frames)
            for k in [*range(n), 0, -1]:
                frames[k]
        assert not list((tmp / "spill").glob("*/*")), "spilled frames left behind"

    for label, blob, suffix in _video_blobs(src, 14, 30):
        path = cases.write(blob, suffix)
        t.case(label, [path.name], lambda p=path: read(p))
    png = _png_bytes(0)
    for i, (label, blob) in enumerate(byte_mutations(png, 15, cuts=3, header=40, header_flips=4, flips=3)[:12]):
        folder = tmp / f"frames{i:03d}"
        _frame_folder(folder, blob, ".png", 1)
        t.case(f"frame folder: {label}", [folder.name], lambda f=folder: read(f))
    return t


# MP4s damaged in the middle. A small MP4 puts its index (moov) in the middle third either way (megavod's
# writer moves it to the front with +faststart, PyAV's default muxing leaves it at the end), so flipped
# bytes there hit the sample tables as often as the frame data. Found by flipping every byte of such files:
# an index entry made huge makes FFmpeg refuse to allocate the table, which PyAV raises as
# av.error.MemoryError ("Cannot allocate memory") from av.open -- a subclass of Python's MemoryError, and
# before megavod/data/video.py caught av.error.FFmpegError it escaped as a traceback. Kept below: the high
# byte of stts's entry count (box + 12) and of stsd's first sample entry size (box + 16), XOR 0x80.
MIDDLE_SIZE = (48, 64)  # (height, width) of the clips below: every decoded frame must keep it


def _moving_frames(count: int = 6) -> list[np.ndarray]:
    yy, xx = np.mgrid[0: MIDDLE_SIZE[0], 0: MIDDLE_SIZE[1]]
    return [np.stack([(4 * xx + 8 * t) % 256, (5 * yy) % 256, (3 * (xx + yy) + 5 * t) % 256], -1).astype(np.uint8)
            for t in range(count)]  # moving gradients: the encoders make P/B frames, not only key frames


def _pyav_mp4(path: Path, frames: list[np.ndarray]) -> None:
    """PyAV's default MP4 muxing (no +faststart: the index after the frame data), MPEG-4 Part 2."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = MIDDLE_SIZE[1], MIDDLE_SIZE[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _mp4_boxes(data: bytes) -> dict[str, int]:
    """Offset of the first box of each type, descending into the boxes that hold the sample tables."""
    found: dict[str, int] = {}
    todo = [(0, len(data))]
    while todo:
        off, end = todo.pop()
        while off + 8 <= end:
            size, kind = struct.unpack(">I4s", data[off: off + 8])
            name = kind.decode("latin-1")
            found.setdefault(name, off)
            if name in ("moov", "trak", "mdia", "minf", "stbl"):
                todo.append((off + 8, off + size))
            if size < 8:
                break
            off += size
    return found


def _middle_blobs(root: Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(label, bytes) of both MP4 layouts damaged in their middle half, and the labels of the cases kept
    for av.error.MemoryError."""
    root.mkdir(parents=True, exist_ok=True)
    frames = _moving_frames()
    write_video(root / "writer.mp4", frames, fps=10)
    _pyav_mp4(root / "pyav.mp4", frames)
    rng = np.random.default_rng(21)
    out: list[tuple[str, bytes]] = []
    memory: list[str] = []
    for layout in ("writer", "pyav"):
        data = (root / f"{layout}.mp4").read_bytes()
        n = len(data)
        offsets = sorted({int(f * n) for f in (0.3, 0.4, 0.5, 0.6, 0.7)} | set(rng.integers(n // 4, 3 * n // 4, 3).tolist()))
        for pos in offsets:
            out.append((f"{layout}: byte {pos} of {n} flipped", _flip_byte(data, pos, 0xFF)))
        for pos in (n // 4, n // 2, 3 * n // 5):
            for length in (1, 8, 64, n // 10):
                out.append((f"{layout}: {length} zero bytes at {pos} of {n}", data[:pos] + bytes(length) + data[pos + length:]))
        boxes = _mp4_boxes(data)
        # A zeroed display matrix (tkhd version 0: at box + 48, 9 x 4 bytes) has no angle: PyAV reported
        # INT_MIN degrees and the frames came out rotated, 64x48.
        matrix = boxes["tkhd"] + 48
        assert data[boxes["tkhd"] + 8] == 0, "tkhd version 1: the matrix is elsewhere"
        out.append((f"{layout}: tkhd display matrix zeroed", data[:matrix] + bytes(36) + data[matrix + 36:]))
        for box, field_offset in (("stts", 12), ("stsd", 16)):
            label = f"{layout}: {box} + {field_offset} XOR 0x80 (av.error.MemoryError)"
            out.append((label, _flip_byte(data, boxes[box] + field_offset, 0x80)))
            memory.append(label)
    return out, memory


def _flip_byte(data: bytes, pos: int, mask: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:]


def _pyav_open_error(path: Path) -> type | None:
    """The PyAV exception plain ``av.open`` raises on ``path`` (None: it opens)."""
    try:
        av.open(str(path)).close()
    except av.error.FFmpegError as err:
        return type(err)
    return None


def _check_memory_cases(t: Tally, paths: dict[str, Path], memory: list[str]) -> None:
    """The kept cases must still make PyAV raise av.error.MemoryError, or they no longer test it."""
    raised = {label: _pyav_open_error(paths[label]) for label in memory}
    if not any(e is av.error.MemoryError for e in raised.values()):
        t.problems.append(f"no kept case makes av.open raise av.error.MemoryError any more: {raised}")


def fuzz_video_middle(src: Sources, tmp: Path, capsys) -> Tally:
    """open_source + decoding of MP4s damaged in the middle: every frame decoded keeps the clip's size."""
    t = Tally("open_source / VideoSource, MP4 damaged in the middle")
    cases = Cases(tmp / "cases", ".mp4")
    blobs, memory = _middle_blobs(tmp / "clips")

    def read(path: Path) -> None:
        with open_source(path) as source:
            shapes = [frame.shape for frame in source]
        assert shapes and set(shapes) == {(*MIDDLE_SIZE, 3)}, f"{path.name}: frames {sorted(set(shapes))}"

    paths = {}
    for label, blob in blobs:
        paths[label] = path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read(p))
    _check_memory_cases(t, paths, memory)
    return t


def fuzz_cli_video_middle(src: Sources, tmp: Path, capsys) -> Tally:
    """``megavod detect`` on the same MP4s: the inputs the library refuses fail alone (one error line
    naming the file, no traceback, no output files, non-zero exit), the others get all three outputs.
    Every refused input runs, and one that decodes per layout (detecting on all of them would only
    time the detector: their frames are checked by fuzz_video_middle)."""
    t = Tally("megavod detect, MP4 damaged in the middle")
    blobs, memory = _middle_blobs(tmp / "clips")
    videos = tmp / "videos"
    videos.mkdir()
    inputs, refused_by_library, layouts_read = [], set(), set()
    for i, (label, blob) in enumerate(blobs):
        path = videos / f"clip{i:03d}.mp4"
        path.write_bytes(blob)
        try:
            with open_source(path) as source:
                for _ in source:
                    pass
        except MegavodError:
            refused_by_library.add(path)
        layout = label.split(":")[0]
        if path in refused_by_library or layout not in layouts_read:
            inputs.append((label, path))
            layouts_read |= set() if path in refused_by_library else {layout}
    _check_memory_cases(t, {label: path for label, path in inputs}, memory)
    argv = [*DETECT, *TINY_MODEL]
    # An input alone: the kept av.error.MemoryError case, the original traceback.
    label, path = next((label, path) for label, path in inputs if label == memory[0])
    out = tmp / "out_alone"
    t.case(f"{label} alone", [path.name], _one_line_detect(["detect", str(path), "--out", str(out), *argv], capsys),
           lambda failed: sorted(p.name for p in out.rglob("*")) if out.exists() else [])
    # All of them, 12 inputs per run: each fails alone or gets its three outputs.
    out = tmp / "out_all"
    for start in range(0, len(inputs), 12):
        chunk = inputs[start: start + 12]
        code = cli_main(["detect", *(str(p) for _, p in chunk), "--out", str(out), *argv])
        err = capsys.readouterr().err
        if "Traceback" in err:
            t.problems.append(f"a traceback on stderr: {err[-500:]}")
        errors = [ln for ln in err.splitlines() if ln.startswith("megavod detect: error:")]
        for label, path in chunk:
            t.cases += 1
            mine = [ln for ln in errors if path.name in ln]
            outputs = sorted(p.name for p in out.glob(f"{path.stem}.*"))
            if len(mine) > 1:
                t.problems.append(f"{label} ({path.name}): {len(mine)} error lines")
            if mine:
                t.refused += 1
                if outputs:
                    t.problems.append(f"{label} ({path.name}): failed but left {outputs}")
            else:
                t.read += 1
                if outputs != [f"{path.stem}.{e}" for e in ("csv", "json", "mp4")]:
                    t.problems.append(f"{label} ({path.name}): no error line, outputs {outputs}")
            if bool(mine) != (path in refused_by_library):
                t.problems.append(f"{label} ({path.name}): the library {'refused' if path in refused_by_library else 'read'} "
                                  f"it, the CLI {'refused' if mine else 'read'} it")
        refused = sum(1 for _, p in chunk if p in refused_by_library)
        if len(errors) != refused or (code != 0) != (refused > 0):
            t.problems.append(f"exit code {code} and {len(errors)} error lines for {refused} refused inputs: {errors}")
    return t


def _one_line_detect(argv: list[str], capsys) -> Callable[[], None]:
    """Run the CLI: exit 0, or a non-zero exit with one error line and no traceback (raised as the
    MegavodError the user sees, for Tally to check that it names the file)."""
    def run() -> None:
        code = cli_main(argv)
        err = capsys.readouterr().err
        if code == 0:
            return
        errors = [ln for ln in err.splitlines() if ln.startswith("megavod detect: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-500:]
        raise MegavodError(errors[0])
    return run


def _png_bytes(seed: int, fmt: str = "PNG", size=(32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _frame_folder(folder: Path, bad: bytes, suffix: str, index: int) -> None:
    folder.mkdir()
    for k in range(3):
        data = bad if k == index else _png_bytes(k, _FORMATS[suffix])
        (folder / f"{k:06d}{suffix}").write_bytes(data)


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".ppm": "PPM", ".webp": "WEBP", ".tif": "TIFF"}


def fuzz_frame_folder(src: Sources, tmp: Path, capsys) -> Tally:
    """open_source of a frame folder (FrameFolderSource): one damaged image among three."""
    t = Tally("frame folder images")
    n = 0

    def read(folder: Path) -> None:
        with open_source(folder) as source:
            for _ in source:
                pass

    for j, (suffix, fmt) in enumerate(_FORMATS.items()):
        data = _png_bytes(9, fmt)
        header = {".png": 40, ".jpg": 200, ".bmp": 54, ".ppm": 16, ".webp": 40, ".tif": 200}[suffix]
        for label, blob in byte_mutations(data, 20 + j, cuts=3, header=header, header_flips=6, flips=2):
            n += 1
            folder = tmp / f"case{n:03d}"
            _frame_folder(folder, blob, suffix, n % 3)
            t.case(f"{suffix}: {label}", [folder.name], lambda f=folder: read(f))
    # A frame of another size, another mode, another format under the suffix.
    odd = [("16-bit grey", ".png", _image_bytes(Image.fromarray(np.zeros((24, 32), np.uint16)), "PNG")),
           ("palette", ".png", _image_bytes(Image.new("P", (32, 24)), "PNG")),
           ("CMYK", ".jpg", _image_bytes(Image.new("CMYK", (32, 24)), "JPEG")),
           ("1-bit", ".bmp", _image_bytes(Image.new("1", (32, 24)), "BMP")),
           ("float TIFF", ".tif", _image_bytes(Image.fromarray(np.zeros((24, 32), np.float32)), "TIFF")),
           ("another size", ".png", _png_bytes(1, "PNG", (30, 20))),
           ("a JPEG named .png", ".png", _png_bytes(1, "JPEG")),
           ("huge PNG header", ".png", _png_header(100_000, 100_000)),
           ("zero-size PNG header", ".png", _png_header(0, 0))]
    for label, suffix, blob in odd:
        n += 1
        folder = tmp / f"case{n:03d}"
        _frame_folder(folder, blob, suffix, 1)
        t.case(label, [folder.name], lambda f=folder: read(f))
    return t


def _image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 40


XML_JUNK = ("", " ", "abc", "1e999", "nan", "-inf", "1.5", "-5", "0", "99999999999999999999999", "0x10",
            "1_000", "\u0663", "n02391049", "n12345678", "n0239104", "<x/>", "&amp;")


def fuzz_vid_xml(src: Sources, tmp: Path, capsys) -> Tally:
    """read_annotation of ILSVRC XML files."""
    t = Tally("read_annotation")
    cases = Cases(tmp, ".xml")
    valid = tmp / "valid.xml"
    write_annotation(valid, _annotation("val/v0", 0), "val/v0", "000000")
    data = valid.read_bytes()
    mutated = byte_mutations(data, 30, cuts=14, header=120, header_flips=10, flips=16)
    rng = np.random.default_rng(31)
    for _ in range(90):
        root = ET.fromstring(data)
        elements = list(root.iter())
        elem = elements[int(rng.integers(len(elements)))]
        op = int(rng.integers(6))
        if op <= 1:
            elem.text = XML_JUNK[int(rng.integers(len(XML_JUNK)))]
            label = f"<{elem.tag}> text {elem.text!r}"
        elif op == 2 and elem is not root:
            parent = next(p for p in root.iter() if elem in list(p))
            parent.remove(elem)
            label = f"<{elem.tag}> removed"
        elif op == 3 and elem is not root:
            parent = next(p for p in root.iter() if elem in list(p))
            parent.append(copy.deepcopy(elem))
            label = f"<{elem.tag}> duplicated"
        elif op == 4:
            label = f"<{elem.tag}> renamed"
            elem.tag = "x" + elem.tag
        else:
            ET.SubElement(elem, "bndbox").text = "1"
            label = f"<{elem.tag}> gets a child"
        mutated.append((label, ET.tostring(root)))
    # Every integer field beyond int64 (they end up in int64 tensors).
    for tag in ("width", "height", "trackid", "occluded", "generated"):
        root = ET.fromstring(data)
        root.find(f".//{tag}").text = "9" * 23
        mutated.append((f"<{tag}> beyond int64", ET.tostring(root)))
    mutated += [("entity", b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "x">]><annotation>&e;</annotation>'),
                ("external entity", b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "/etc/passwd">]>'
                                    b"<annotation>&e;</annotation>"),
                ("UTF-16", data.decode().replace("utf-8", "utf-16").encode("utf-16")),
                ("deep nesting", b"<a>" * 20000)]
    for label, blob in mutated:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_annotation(p, "val/v0", 0))
    return t


def _json_cases(doc: dict, seed: int, n: int) -> list[tuple[str, bytes]]:
    data = json.dumps(doc).encode()
    out = byte_mutations(data, seed, cuts=10, header=80, header_flips=8, flips=10)
    out += [(label, json.dumps(d).encode()) for label, d in tree_mutations(doc, seed + 1, n)]
    numbers = list(re.finditer(rb"\d+", data))
    rng = np.random.default_rng(seed + 2)
    for m in (numbers[int(i)] for i in rng.integers(0, len(numbers), 4)):
        out.append((f"5000 digits at {m.start()}", data[: m.start()] + b"9" * 5000 + data[m.end():]))
        out.append((f"-2**64 at {m.start()}", data[: m.start()] + str(-(2**64)).encode() + data[m.end():]))
    out += SPECIAL_JSON
    return out


def fuzz_coco_vid(src: Sources, tmp: Path, capsys) -> Tally:
    """read_coco_vid of COCO-VID JSON files."""
    t = Tally("read_coco_vid")
    cases = Cases(tmp, ".json")
    valid = tmp / "valid.json"
    videos = [CocoVidVideo("a", [_annotation("a", 0), _annotation("a", 1)], train_frames=[0]),
              CocoVidVideo("b", [_annotation("b", 0, (-1, 2))])]
    write_coco_vid(valid, videos)
    doc = json.loads(valid.read_text())
    for label, blob in _json_cases(doc, 40, 110):
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_coco_vid(p))
    return t


def fuzz_predictions(src: Sources, tmp: Path, capsys) -> Tally:
    """read_predictions of prediction files."""
    t = Tally("read_predictions")
    cases = Cases(tmp, ".json")
    valid = tmp / "valid.json"
    write_predictions(valid, _video_predictions())
    doc = json.loads(valid.read_text())
    for label, blob in _json_cases(doc, 50, 110):
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_predictions(p))
    return t


IMAGE_SET_JUNK = ("x", "-1", "1e3", "9" * 30, "9" * 5000, "\u0663", "0x1", "1.0", "a" * 5000, "a\x00b", "../..")


def fuzz_image_sets(src: Sources, tmp: Path, capsys) -> Tally:
    """read_image_set of the authors' ImageSets/*.txt lists, with and without checking the images."""
    t = Tally("read_image_set")
    cases = Cases(tmp, ".txt")
    root = tmp / "Data"
    for k in range(3):
        (root / "val" / "v0").mkdir(parents=True, exist_ok=True)
        (root / "val" / "v0" / f"{k:06d}.JPEG").write_bytes(b"")
    four, two = tmp / "four.txt", tmp / "two.txt"
    write_image_set(four, [ImageSetEntry("val/v0", k, 3, k + 1) for k in range(3)])
    write_image_set(two, [ImageSetEntry(f"val/v0/{k:06d}", None, None, k + 1) for k in range(3)])
    blobs = []
    rng = np.random.default_rng(60)
    for seed, valid in ((61, four), (62, two)):
        data = valid.read_bytes()
        blobs += byte_mutations(data, seed, cuts=6, header=40, header_flips=6, flips=8)
        for _ in range(30):
            lines = [ln.split(" ") for ln in data.decode().splitlines()]
            i = int(rng.integers(len(lines)))
            j = int(rng.integers(len(lines[i])))
            op = int(rng.integers(4))
            if op <= 1:
                lines[i][j] = IMAGE_SET_JUNK[int(rng.integers(len(IMAGE_SET_JUNK)))]
                label = f"line {i + 1} column {j + 1} = {lines[i][j][:12]!r}"
            elif op == 2:
                del lines[i][j]
                label = f"line {i + 1} column {j + 1} removed"
            else:
                lines[i].append("7")
                label = f"line {i + 1} gets a column"
            blobs.append((label, "\n".join(" ".join(ln) for ln in lines).encode()))
    blobs += [("non-UTF-8", b"val/v\xe9 1 0 3\n"), ("UTF-16", "val/v0 1 0 3\n".encode("utf-16")),
              ("blank lines", b"\n\n \n"), ("NUL", b"\x00 1\n")]
    for label, blob in blobs:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: read_image_set(p))
        t.case(label + " (checking images)", [path.name], lambda p=path: read_image_set(p, must_exist_root=root))
    return t


def fuzz_config(src: Sources, tmp: Path, capsys) -> Tally:
    """load_config of YAML paths, following ``_base_`` chains."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # relative _base_ paths: the bytes, and so the mutations, do not depend on the tmp folder
        return _fuzz_config(Tally("load_config YAML"), Cases(tmp, ".yaml"))


def _fuzz_config(t: Tally, cases: Cases) -> Tally:
    base_doc = {"_base_": "synthetic_single", "method": "mega", "mega": {"T_l": 5},
                "input": {"min_size_test": 48, "max_size_test": 64},
                "model": {"rpn": {"anchor_sizes": [16, 32]}, "roi_head": {"score_thresh": 0.1}}}
    Path("base.yaml").write_text(yaml.safe_dump(base_doc))
    top_doc = {"_base_": "base.yaml", "solver": {"max_iter": 10, "steps": [5]}, "data": {"train_sets": ["a"]}}
    valid = Path("valid.yaml")
    valid.write_text(yaml.safe_dump(top_doc))
    load_config(str(valid))
    blobs = byte_mutations(valid.read_bytes(), 70, cuts=6, header=len(valid.read_bytes()), header_flips=16, flips=0)
    blobs += [(label, yaml.safe_dump(d).encode()) for label, d in tree_mutations(top_doc, 71, 40)]
    blobs += SPECIAL_YAML
    for label, blob in blobs:
        path = cases.write(blob)
        t.case(label, [path.name], lambda p=path: load_config(str(p)))
    # A damaged base under a valid top file: the message names one of the two.
    bad_bases = [(f"base: {label}", yaml.safe_dump(doc).encode()) for label, doc in tree_mutations(base_doc, 72, 40)]
    bad_bases += [("base not UTF-8", b"mega: {T_l: \xff}\n"), ("base invalid", b"mega: [\n"), ("base a list", b"- 1\n")]
    for label, blob in bad_bases:
        bad_base = cases.write(blob)
        path = cases.write(yaml.safe_dump({**top_doc, "_base_": bad_base.name}).encode())
        t.case(label, [path.name, bad_base.name], lambda p=path: load_config(str(p)))
    a, b = Path("loop_a.yaml"), Path("loop_b.yaml")
    a.write_text(f"_base_: {b}\n")
    b.write_text(f"_base_: {a}\n")
    t.case("a two-file loop", [a.name, b.name], lambda: load_config(str(a)))
    return t


def fuzz_cli(src: Sources, tmp: Path, capsys) -> Tally:
    """The command line: bad weights, configs, videos and prediction files exit non-zero with one
    line and no traceback, and leave no output file."""
    t = Tally("megavod CLI")
    clip = src.clip

    def one_line(argv: list[str]) -> Callable[[], None]:
        def run() -> None:
            code = cli_main(argv)
            err = capsys.readouterr().err
            errors = [ln for ln in err.splitlines() if "error:" in ln]
            if code == 0:
                return
            assert len(errors) == 1 and "Traceback" not in err, err[-500:]
            raise MegavodError(errors[0])  # the line the user sees, checked by Tally like any message
        return run

    def nothing_in(out: Path) -> Callable[[bool], list[str]]:
        return lambda failed: sorted(p.name for p in out.rglob("*")) if failed and out.exists() else []

    weights = Cases(tmp / "weights", ".pth")
    bad_weights = [weights.write(text) for text in (b"a", b".", b"hello", b"x y z", b"\x80\x02", b"PK\x03\x04")]
    torch.save([1, 2], bad := weights.folder / "list.pth")
    bad_weights.append(bad)
    torch.save({"format": "megavod", "model": _small_tensors(), "config": {"model": [1]}}, bad := weights.folder / "cfg.pth")
    bad_weights.append(bad)
    save_file(_small_tensors(), bad := weights.folder / "date.safetensors", metadata={"config": "a: 2020-13-45"})
    bad_weights.append(bad)
    for i, path in enumerate(bad_weights):
        out = tmp / f"out_w{i}"
        t.case(f"detect --weights {path.name}", [path.name],
               one_line(["detect", str(clip), "--weights", str(path), "--out", str(out), "--device", "cpu"]),
               nothing_in(out))
        out = tmp / f"conv_w{i}"
        t.case(f"convert {path.name}", [path.name],
               one_line(["convert", str(path), str(out / "x.safetensors")]), nothing_in(out))
    configs = Cases(tmp / "configs", ".yaml")
    for label, text in SPECIAL_YAML[:12]:
        path = configs.write(text)
        out = tmp / f"out_c{configs.n}"
        t.case(f"detect --config ({label})", [path.name],
               one_line(["detect", str(clip), "--config", str(path), "--out", str(out), "--device", "cpu"]),
               nothing_in(out))
    preds = Cases(tmp / "preds", ".json")
    valid = tmp / "valid_pred.json"
    write_predictions(valid, _video_predictions())
    for label, blob in _json_cases(json.loads(valid.read_text()), 80, 10)[::4]:
        path = preds.write(blob)
        out = tmp / f"out_p{preds.n}"
        t.case(f"postprocess ({label})", [path.name],
               one_line(["postprocess", "--method", "seqnms", str(path), str(out / "post.json")]), nothing_in(out))

    # Damaged videos, many inputs per run: each input fails alone (one line naming it, no output) or
    # gets all three outputs.
    videos = tmp / "videos"
    videos.mkdir()
    blobs = _video_blobs(src, 90, 24)
    inputs = []
    for i, (label, blob, suffix) in enumerate(blobs):
        path = videos / f"clip{i:03d}{suffix}"
        path.write_bytes(blob)
        inputs.append((label, path))
    out = tmp / "out_videos"
    for start in range(0, len(inputs), 8):
        chunk = inputs[start: start + 8]
        code = None
        try:
            code = cli_main(["detect", *(str(p) for _, p in chunk), "--out", str(out), *DETECT])
            err = capsys.readouterr().err
        except Exception as e:  # noqa: BLE001
            err = capsys.readouterr().err
            t.problems.append(f"detect of {[p.name for _, p in chunk]}: {type(e).__name__} leaked: {_first_line(e)}")
        errors = [ln for ln in err.splitlines() if ln.startswith("megavod detect: error:")]
        for label, path in chunk:
            t.cases += 1
            mine = [ln for ln in errors if path.name in ln]
            outputs = sorted(p.name for p in out.glob(f"*{path.stem}*")) if out.exists() else []
            if mine:
                t.refused += 1
                if outputs:
                    t.problems.append(f"{label} ({path.name}): failed but left {outputs}")
            elif code is not None:
                t.read += 1
                if outputs != [f"{path.stem}.{e}" for e in ("csv", "json", "mp4")]:
                    t.problems.append(f"{label} ({path.name}): no error line, outputs {outputs}")
        if code is not None and len(errors) != sum(1 for _, p in chunk if any(p.name in ln for ln in errors)):
            t.problems.append(f"error lines naming no input: {errors}")
    return t


# reader -> (its cases, the fewest cases it must run)
READERS = {
    "pth": (fuzz_pth, 150), "safetensors": (fuzz_safetensors, 150), "recorded_config": (fuzz_recorded_config, 100),
    "recognise": (fuzz_recognise, 45), "detectron_pickle": (fuzz_detectron_pickle, 80),
    "backbone_weights": (fuzz_backbone_weights, 50), "convert": (fuzz_convert, 40),
    "video": (fuzz_video, 60), "video_middle": (fuzz_video_middle, 40), "random_access": (fuzz_random_access, 40), "frame_folder": (fuzz_frame_folder, 150),
    "vid_xml": (fuzz_vid_xml, 150), "coco_vid": (fuzz_coco_vid, 150), "predictions": (fuzz_predictions, 150),
    "image_sets": (fuzz_image_sets, 150), "config": (fuzz_config, 150), "cli": (fuzz_cli, 60),
    "cli_video_middle": (fuzz_cli_video_middle, 10),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_reader_raises_only_megavod_errors(reader, sources, tmp_path, capsys, request, record_property):
    run, minimum = READERS[reader]
    tally = run(sources, tmp_path, capsys)
    record_property("cases", tally.cases)
    if request.config.getoption("capture") == "no":  # -s: one line per reader
        with capsys.disabled():
            print(f"\n{tally.summary()}")
    tally.check(minimum)
