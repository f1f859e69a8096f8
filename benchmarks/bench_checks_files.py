"""File checks in a warm process: a typical 20x10 CSV table and a typical 30-cell notebook
(target: each under 50 ms), plus a figure with its table and a small XLSX for reference."""

from __future__ import annotations

import base64
import io
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from airlock.checks.engine import check_file, check_files
from airlock.policy import load_policy

REPEATS = 30


def csv_20x10() -> str:
    rng = random.Random(3)
    header = "region," + ",".join(f"count_{2010 + i}" for i in range(9))
    rows = [
        f"region_{r}," + ",".join(str(rng.randint(11, 400)) for _ in range(9)) for r in range(20)
    ]
    return header + "\n" + "\n".join(rows) + "\n"


def png() -> bytes:
    from PIL import Image

    im = Image.new("RGB", (640, 480), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def notebook_30_cells() -> str:
    rng = random.Random(4)
    cells = []
    table = (
        "<table><thead><tr><th>site</th><th>count</th></tr></thead><tbody>"
        + "".join(f"<tr><td>site_{i}</td><td>{rng.randint(11, 300)}</td></tr>" for i in range(8))
        + "</tbody></table>"
    )
    image = base64.b64encode(png()).decode()
    for i in range(30):
        if i % 3 == 0:
            cells.append(
                {
                    "cell_type": "markdown",
                    "metadata": {},
                    "source": f"## Step {i}\nWe look at incidence by site and period.",
                }
            )
            continue
        outputs: list[dict] = [{"output_type": "stream", "name": "stdout", "text": "done\n"}]
        if i % 5 == 1:
            outputs.append(
                {
                    "output_type": "execute_result",
                    "execution_count": i,
                    "metadata": {},
                    "data": {"text/html": table, "text/plain": "<table>"},
                }
            )
        if i == 29:
            outputs.append(
                {
                    "output_type": "display_data",
                    "metadata": {},
                    "data": {"image/png": image, "text/plain": "<Figure>"},
                }
            )
        cells.append(
            {
                "cell_type": "code",
                "execution_count": i,
                "metadata": {},
                "source": f"result_{i} = query(con, 'site')",
                "outputs": outputs,
            }
        )
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


def timed(fn) -> tuple[float, float]:
    fn()  # warm: imports and caches
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    policy = load_policy()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "table.csv").write_text(csv_20x10())
        (d / "analysis.ipynb").write_text(notebook_30_cells())
        (d / "fig.png").write_bytes(png())
        (d / "fig.csv").write_text(csv_20x10())
        cases = {
            "20x10 CSV table": lambda: check_file(d / "table.csv", policy),
            "30-cell notebook (8 tables, 1 image)": lambda: check_file(
                d / "analysis.ipynb", policy
            ),
            "figure + its 20x10 table": lambda: check_files([d / "fig.png"], policy),
        }
        for name, fn in cases.items():
            status = fn()
            status = status[0].status if isinstance(status, list) else status.status
            median, worst = timed(fn)
            print(f"{name:40} median {median:6.1f} ms  max {worst:6.1f} ms  ({status.value})")
    print("target: a typical output under 50 ms in a warm process")


if __name__ == "__main__":
    main()
