"""Attacks on the file checks: ids of the extract disguised in every place a file can hide them,
against a real DuckDB extract whose ids have the form of the pooled data's pseudonyms (32 hex
characters). Every file here passed the checks before they were hardened (see
docs/checks-files.md, "Red-team findings"); each must now fail with ``leak.identifier``, and a
file holding other hex strings must not."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from airlock.checks.engine import check_file
from airlock.checks.leaks import ExtractIndex, find_identifiers_in_text, id_fragments
from airlock.policy import load_policy

sys.path.insert(0, str(Path(__file__).parent / "corpus" / "files"))
from file_corpus import (  # noqa: E402
    SVG_HEAD,
    _workbook,
    code_cell,
    notebook,
    png_bytes,
    result,
)

POLICY = load_policy()
N = 2000


def pid(i: int) -> str:
    return hashlib.sha256(f"p{i}".encode()).hexdigest()[:32]


def tid(i: int) -> str:
    return hashlib.sha256(f"t{i}".encode()).hexdigest()[:32]


ID = pid(17)
COUNTS = (("north", 143), ("south", 121), ("east", 67), ("west", 58))


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("extract") / "proj.duckdb"
    patients = pl.DataFrame(
        {"patient_id": [pid(i) for i in range(N)], "sex": ["F", "M"] * (N // 2)}
    )
    tumours = pl.DataFrame(
        {"tumour_id": [tid(i) for i in range(N)], "patient_id": [pid(i) for i in range(N)]}
    )
    con = duckdb.connect(str(path))
    con.register("p", patients.to_arrow())
    con.register("t", tumours.to_arrow())
    con.execute("CREATE TABLE patient AS SELECT * FROM p")
    con.execute("CREATE TABLE tumour AS SELECT * FROM t")
    con.close()
    return path


def counts_csv(note: list[str]) -> str:
    rows = "".join(f"{r},{n},{v}\n" for (r, n), v in zip(COUNTS, note + [""] * 4, strict=False))
    return "region,count,note\n" + rows


def xlsx(change=None, extra: dict[str, str] | None = None) -> bytes:
    return _workbook(change, extra, rows=COUNTS)


def _defined_name(wb, ws):
    from openpyxl.workbook.defined_name import DefinedName

    wb.defined_names["ids"] = DefinedName("ids", attr_text=f'"{ID}"')


def _validation(wb, ws):
    from openpyxl.worksheet.datavalidation import DataValidation

    dv = DataValidation(type="list", formula1=f'"{ID[:20]},other"')
    ws.add_data_validation(dv)
    dv.add("C2")


def _title(wb, ws):
    wb.properties.title = ID


def _footer(wb, ws):
    ws.oddFooter.center.text = ID


def nb(cells: list[dict], **metadata) -> str:
    doc = json.loads(notebook(cells))
    doc["metadata"].update(metadata)
    return json.dumps(doc)


UUID = f"{ID[:8]}-{ID[8:12]}-{ID[12:16]}-{ID[16:20]}-{ID[20:]}"
# every file passed the checks before (status pass, or review for figures and notebooks)
ATTACKS: dict[str, str | bytes] = {
    "upper.csv": counts_csv([ID.upper()]),
    "prefixed.csv": counts_csv(["id_" + ID]),
    "in_a_sentence.csv": counts_csv([f"example child {ID} was excluded"]),
    "uuid_dashes.csv": counts_csv([UUID]),
    "colon_pairs.csv": counts_csv([":".join(ID[i : i + 2] for i in range(0, 32, 2))]),
    "truncated_16.csv": counts_csv([ID[:16]]),
    "suffix_20.csv": counts_csv([ID[-20:]]),
    "reversed.csv": counts_csv([ID[::-1]]),
    "zero_width.csv": counts_csv([ID[:10] + "\u200b" + ID[10:]]),
    "base64_bytes.csv": counts_csv([base64.b64encode(bytes.fromhex(ID)).decode()]),
    "base32_bytes.csv": counts_csv([base64.b32encode(bytes.fromhex(ID)).decode()]),
    "base64_text.csv": counts_csv([base64.b64encode(ID.encode()).decode()]),
    "split_columns.csv": "region,count,a,b\n"
    + "".join(
        f"{r},{n},{ID[:16] if i == 0 else ''},{ID[16:] if i == 0 else ''}\n"
        for i, (r, n) in enumerate(COUNTS)
    ),
    "split_in_four.csv": "region,count,a,b,c,d\n"
    + "".join(
        f"{r},{n}," + (",".join(ID[k : k + 8] for k in range(0, 32, 8)) if i == 0 else ",,,") + "\n"
        for i, (r, n) in enumerate(COUNTS)
    ),
    "split_rows.csv": counts_csv([ID[:16], ID[16:]]),
    "in_header.csv": f"region,count,{ID}\nnorth,143,x\nsouth,121,y\n",
    "prefixed.md": f"Excluded record id_{ID} after review.\n",
    "upper.log": f"INFO dropping {ID.upper()}\n",
    "value.json": json.dumps({"summary": {"n": 143, "note": f"excluded {ID}"}}),
    "escaped.json": '{"note": "' + "".join(f"\\u{ord(c):04x}" for c in ID) + '"}',
    "comment.html": f"<html><body><p>Summary</p><!-- {ID} --></body></html>",
    "attribute.html": f'<html><body><p title="{ID}">Summary</p></body></html>',
    "head.html": f"<html><head><title>{ID}</title></head><body><p>Summary</p></body></html>",
    "entities.html": "<html><body><!-- "
    + "".join(f"&#x{ord(c):x};" for c in ID)
    + " --><p>Summary</p></body></html>",
    "desc.svg": f'{SVG_HEAD} width="10" height="10"><desc>{ID}</desc></svg>',
    "notebook_metadata.ipynb": nb([code_cell("x = 1", [])], hidden=[ID]),
    "widget_state.ipynb": nb(
        [code_cell("w", [])],
        widgets={"application/vnd.jupyter.widget-state+json": {"state": {"m": {"v": [ID]}}}},
    ),
    "json_output.ipynb": nb(
        [code_cell("x", [result({"text/plain": "<obj>", "application/json": {"ids": [ID]}})])]
    ),
    "error_value.ipynb": nb(
        [
            code_cell(
                "x",
                [{"output_type": "error", "ename": "KeyError", "evalue": ID, "traceback": []}],
            )
        ]
    ),
    "upper_source.ipynb": nb([code_cell(f"ids = ['{ID.upper()}']", [])]),
    "defined_name.xlsx": xlsx(_defined_name),
    "validation_list.xlsx": xlsx(_validation),
    "doc_title.xlsx": xlsx(_title),
    "footer.xlsx": xlsx(_footer),
    "custom_xml.xlsx": xlsx(extra={"customXml/item1.xml": f"<r id='{ID}'/>"}),
    "png_text.png": png_bytes(text={"Comment": ID}),
    "png_software.png": png_bytes(text={"Software": ID}),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_disguised_id_fails(tmp_path, extract, name):
    path = tmp_path / name
    content = ATTACKS[name]
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    report = check_file(path, POLICY, extract_path=extract)
    ident = [f for f in report.findings if f.rule == "leak.identifier"]
    assert report.status.value == "fail" and ident, [f.model_dump() for f in report.findings]
    # the finding never prints the id itself
    assert ID not in json.dumps([f.model_dump() for f in ident])


def test_tumour_ids_are_found_too(tmp_path, extract):
    path = tmp_path / "t.csv"
    path.write_text(counts_csv([tid(5).upper()[:20]]))
    assert any(
        f.rule == "leak.identifier" for f in check_file(path, POLICY, extract_path=extract).findings
    )


def test_other_hex_strings_are_not_ids(tmp_path, extract):
    """Hashes, commit ids, UUIDs and colours that are not ids of the extract pass."""
    text = (
        "git commit 9fceb02d0ae598e95dc970b74767f19372d61af8\n"
        f"sha256 {hashlib.sha256(b'x').hexdigest()}\n"
        "run 123e4567-e89b-12d3-a456-426614174000 colour #ff8800\n"
        f"md5 {hashlib.md5(b'y').hexdigest()}\n"
        "counts 1234567890123456789 20240101123456\n"
    )
    with ExtractIndex(extract) as index:
        assert find_identifiers_in_text(text, index) is None
    path = tmp_path / "hashes.csv"
    path.write_text(
        "region,count,run\n" + "".join(f"{r},{n},{text.split()[2]}\n" for r, n in COUNTS)
    )
    report = check_file(path, POLICY, extract_path=extract)
    assert report.status.value == "pass", [f.model_dump() for f in report.findings]


def test_fragments_need_a_hex_letter_and_sixteen_characters():
    assert id_fragments("12345678901234567890") == set()  # a number
    assert id_fragments("abcdef0123") == set()  # too short
    windows = id_fragments(f"x-{ID.upper()}-y")
    assert ID[:16] in windows and ID[::-1][:16] in windows


def test_a_hex_dump_is_refused_not_searched_forever(tmp_path, extract):
    dump = "\n".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000))
    path = tmp_path / "dump.txt"
    path.write_text(dump)
    report = check_file(path, POLICY, extract_path=extract)
    assert report.status.value == "fail"
