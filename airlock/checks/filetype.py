"""What a file IS, decided from its content (magic bytes and structure), never from its name.

The ``filetype`` package recognises most binary formats from their magic bytes; it knows nothing
of the data formats a TRE must refuse above all (Parquet, Arrow, DuckDB, pickles, NumPy, HDF5,
R data) nor of text formats, so those signatures and the text sniffing live here.
"""

from __future__ import annotations

import codecs
import json
import re
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import filetype as _filetype

# Every kind this module can report. Kinds in ``TEXT_KINDS`` are UTF-8 text.
TEXT_KINDS = frozenset({"csv", "tsv", "json", "ipynb", "svg", "html", "xml", "text", "script"})
# Kinds the airlock can check; everything else is refused whatever the policy says.
CHECKABLE_KINDS = frozenset({"csv", "tsv", "json", "ipynb", "svg", "html", "text", "png", "jpeg"})
CHECKABLE_KINDS = CHECKABLE_KINDS | {"xlsx"}

# The kind a file name promises, from its extension.
EXTENSION_KINDS: dict[str, str] = {
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "json": "json",
    "ipynb": "ipynb",
    "svg": "svg",
    "html": "html",
    "htm": "html",
    "txt": "text",
    "md": "text",
    "markdown": "text",
    "log": "text",
    "png": "png",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "xlsx": "xlsx",
    "xlsm": "xlsm",
    "xls": "ole2",
    "zip": "zip",
    "parquet": "parquet",
    "duckdb": "duckdb",
    "db": "sqlite",
    "sqlite": "sqlite",
    "pkl": "pickle",
    "pickle": "pickle",
    "feather": "arrow",
    "arrow": "arrow",
    "npy": "numpy",
    "npz": "zip",
    "gz": "gzip",
    "tar": "tar",
    "pdf": "pdf",
    "xml": "xml",
}
# Kinds whose extensions may stand for one another without a mismatch (all plain text that a
# checker reads as such: a .txt holding CSV or a .log holding JSON lines is not a disguise).
_TEXT_COMPATIBLE = {
    "text": {"text", "csv", "tsv", "json"},
    "csv": {"csv", "tsv"},
    "tsv": {"tsv", "csv"},
}

# (offset, signature, kind): formats ``filetype`` does not know, and the data formats first.
_SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"PAR1", "parquet"),
    (0, b"ARROW1", "arrow"),
    (0, b"FEA1", "arrow"),
    (8, b"DUCK", "duckdb"),
    (0, b"SQLite format 3\x00", "sqlite"),
    (0, b"\x93NUMPY", "numpy"),
    (0, b"\x89HDF\r\n\x1a\n", "hdf5"),
    (0, b"RDX2\n", "rdata"),
    (0, b"RDX3\n", "rdata"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole2"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"PK\x07\x08", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (257, b"ustar", "tar"),
    (0, b"\x7fELF", "executable"),
    (0, b"MZ", "executable"),
    (0, b"\xcf\xfa\xed\xfe", "executable"),
    (0, b"\xce\xfa\xed\xfe", "executable"),
    (0, b"\xfe\xed\xfa\xce", "executable"),
    (0, b"\xfe\xed\xfa\xcf", "executable"),
    (0, b"\xca\xfe\xba\xbe", "executable"),
    (0, b"\x00asm", "executable"),
    (0, b"%PDF", "pdf"),
    (0, b"\xff\xfe", "utf16"),
    (0, b"\xfe\xff", "utf16"),
]
_PICKLE = re.compile(rb"^\x80[\x02-\x05]")
_REASONS = {
    "zip": "a ZIP archive (its contents cannot be reviewed)",
    "xlsm": "a macro-enabled spreadsheet (VBA project inside)",
    "office": "an office document other than XLSX",
    "ole2": "a legacy Office file (XLS/DOC) that can carry macros",
    "parquet": "a Parquet data file (row-level data)",
    "arrow": "an Arrow/Feather data file (row-level data)",
    "duckdb": "a DuckDB database (row-level data)",
    "sqlite": "an SQLite database (row-level data)",
    "pickle": "a Python pickle (opaque data, executable on load)",
    "numpy": "a NumPy array file (opaque data)",
    "hdf5": "an HDF5 data file",
    "rdata": "an R data file",
    "executable": "an executable program",
    "script": "an executable script (starts with #!)",
    "pdf": "a PDF document (cannot be checked automatically)",
    "utf16": "UTF-16 text (save as UTF-8)",
    "binary": "binary data of an unknown format",
    "xml": "XML other than SVG",
}
_SAMPLE = 64 * 1024
NUL = b"\x00"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class DetectedType:
    kind: str  # what the content is (see module constants)
    extension: str  # lower-case extension of the name, without the dot ('' if none)
    declared: str | None  # the kind the extension promises, None for an unknown extension
    detail: str = ""  # why: e.g. 'invalid UTF-8 at byte 1234'

    @property
    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS

    @property
    def policy_name(self) -> str:
        """The name of this type in ``policy.allowed_file_types``."""
        if self.kind == "text":
            return self.extension if self.extension in {"txt", "md", "log"} else "txt"
        return self.kind

    @property
    def mismatch(self) -> bool:
        if self.declared is None or self.declared == self.kind:
            return False
        return self.kind not in _TEXT_COMPATIBLE.get(self.declared, set())

    def reason(self) -> str:
        """Words for a checker: what the content is."""
        return _REASONS.get(self.kind, f"{self.kind.upper()} content")


def _zip_kind(data: bytes) -> str:
    """Tell XLSX from macro-enabled workbooks, other office files and plain archives."""
    try:
        with zipfile.ZipFile(BytesIO(data)) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return "zip"
    if "[Content_Types].xml" in names and "xl/workbook.xml" in names:
        if any(n.lower().endswith("vbaproject.bin") for n in names):
            return "xlsm"
        return "xlsx"
    if "[Content_Types].xml" in names or "mimetype" in names:
        return "office"
    return "zip"


def _text_kind(text: str, extension: str) -> str:
    head = text.lstrip("\ufeff \t\r\n")[:4096]
    if head.startswith("#!"):
        return "script"
    if head[:1] and head[:1] in "{[":  # ("" is in every string)
        if head[:1] == "{" and '"cells"' in text[:200_000] and '"nbformat"' in text:
            return "ipynb"
        return "json"
    if head.startswith("<"):
        low = head.lower()
        # skip an XML declaration, comments and a doctype to find the root element
        root = re.search(r"<(?![?!])([a-zA-Z][\w:.-]*)", low)
        name = root.group(1) if root else ""
        if name in {"svg", "svg:svg"}:
            return "svg"
        if name in {"html", "head", "body", "table", "div", "p", "meta", "style"} or (
            "<!doctype html" in low
        ):
            return "html"
        return "xml"
    lines = [ln for ln in head.splitlines()[:20] if ln.strip()]
    if len(lines) >= 2:
        for sep, kind in (("\t", "tsv"), (",", "csv"), (";", "csv")):
            counts = [ln.count(sep) for ln in lines[:-1] or lines]
            if counts[0] >= 1 and len(set(counts)) == 1:
                return kind
    if extension in {"csv", "tsv"} and lines:
        return extension  # a header-only or one-column table
    return "text"


def detect_bytes(data: bytes, name: str = "") -> DetectedType:
    """The kind of ``data`` (a whole file or its first bytes), given its file ``name``."""
    extension = Path(name).suffix.lower().lstrip(".")
    declared = EXTENSION_KINDS.get(extension)

    def result(kind: str, detail: str = "") -> DetectedType:
        return DetectedType(kind=kind, extension=extension, declared=declared, detail=detail)

    head = data[:_SAMPLE]
    for offset, sig, kind in _SIGNATURES:
        if head[offset : offset + len(sig)] == sig:
            return result(_zip_kind(data) if kind == "zip" else kind)
    if _PICKLE.match(head):  # no text starts with 0x80 (not a UTF-8 lead byte)
        return result("pickle")
    guess = _filetype.guess(head) if head else None
    if guess is not None:
        return result("binary", f"{guess.mime}")
    if not data:
        return result("empty")
    if b"\x00" in head:
        return result("binary", f"NUL byte at offset {head.index(NUL)}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(head, final=len(data) <= _SAMPLE)
    except UnicodeDecodeError as exc:
        return result("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
    if text and len(_CONTROL.findall(text[:8192])) > max(8, len(text[:8192]) // 100):
        return result("binary", "control characters in text")
    return result(_text_kind(text, extension))


def detect_file(path: Path) -> DetectedType:
    """Like ``detect_bytes`` reading only the first bytes of ``path`` (ZIPs are opened)."""
    with open(path, "rb") as fh:
        head = fh.read(_SAMPLE)
    if head.startswith(b"PK"):
        return detect_bytes(Path(path).read_bytes(), Path(path).name)
    return detect_bytes(head, Path(path).name)


def decode_text(data: bytes) -> str:
    """UTF-8 text (an optional BOM dropped); raises ValueError naming the first bad byte."""
    if b"\x00" in data:
        raise ValueError(f"NUL byte at offset {data.index(NUL)}: not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def loads_json(text: str, max_depth: int = 100) -> object:
    """json.loads refusing documents nested deeper than ``max_depth`` before parsing them.

    The depth is measured on the raw text (brackets outside strings) so a 10^5-deep document
    is refused in linear time instead of exhausting the parser's recursion.
    """
    depth = 0
    deepest = 0
    # strip string literals so brackets inside strings do not count
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for ch in "".join(re.findall(r"[\[\]{}]", skeleton)):
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise ValueError(f"JSON nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
