"""The README's replay table with a significance column is read from the stored reports, not typed by eye:
every mean ± std, difference, interval, p, sign count and verdict it shows equals what `report` wrote to
results/replay/<study>/ (summary.csv, significance.csv). A re-run that changes a verdict without the README
changing with it fails here."""

import csv
import re

from conftest import ROOT

README = ROOT / "README.md"
STUDY = ROOT / "results" / "replay" / "replay_memory"
# the README's column names -> the report's row values; the baselines the difference rows are taken against
ROWS = {"memory": "memory", "static prefix": "prefix_static", "APT": "apt", "LoRA": "lora"}
BASELINES = {"row - memory": STUDY / "significance.csv", "row - static prefix": STUDY / "vs_static" / "significance.csv"}
CELL = re.compile(r"^(?P<delta>[+-]\d+\.\d) \[(?P<low>[+-]\d+\.\d), (?P<high>[+-]\d+\.\d)\], p (?P<p>\d\.\d{3}); "
                  r"samples (?P<plus>\d+)/(?P<minus>\d+), p (?P<p_pairs>\d\.\d{3}): (?P<verdict>.+)$")


def table(title: str) -> tuple[list[str], dict[str, list[str]]]:
    """The README table whose header row starts with `title`: its column names and its rows by first cell."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {title} |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return head, rows


def x100(v: str) -> str:
    return f"{float(v) * 100:+.1f}"


def check_cell(cell: str, t: dict, where: str) -> None:
    """A README difference cell against its significance.csv row (BLEU on a 0-1 scale shown x 100)."""
    m = CELL.match(cell)
    assert m, f"{where}: {cell!r} is not in the table's format"
    plus, minus, _ = t["signs"].split("/")
    assert m["delta"] == x100(t["delta"]), where
    assert (m["low"], m["high"]) == (x100(t["low"]), x100(t["high"])), where
    assert m["p"] == f"{float(t['p_bootstrap']):.3f}" and m["p_pairs"] == f"{float(t['p_pairs']):.3f}", where
    assert (m["plus"], m["minus"]) == (plus, minus), where
    assert m["verdict"] == t["verdict"], f"{where}: the README says {m['verdict']!r}"


def test_the_memory_table_equals_the_stored_report():
    head, rows = table("BLEU x 100 | memory")
    summary = {r["row"]: r for r in csv.DictReader(open(STUDY / "summary.csv"))}
    n = {int(r["n"]) for r in summary.values()}
    assert len(n) == 1 and f"n = {n.pop()}" in README.read_text()
    reports = {label: {r["row"]: r for r in csv.DictReader(open(path)) if r["metric"] == "test/BLEU"}
               for label, path in BASELINES.items()}
    checked = 0
    for col, name in enumerate(head[1:], start=1):
        key = ROWS[name]
        mean, std = float(summary[key]["test/BLEU mean"]), float(summary[key]["test/BLEU std"])
        assert rows["mean ± std"][col] == f"{mean * 100:.1f} ± {std * 100:.1f}", name
        for label, tests in reports.items():
            cell = rows[label][col]
            if cell == "":
                continue
            assert key in tests, f"{label} / {name}: the report has no such comparison"
            check_cell(cell, tests[key], f"{label} / {name}")
            checked += 1
    assert checked == 4  # three rows against memory, APT against the static prefix


# the low-data table (PREFIX vs FT): column -> the training size
LOWDATA = ROOT / "results" / "replay" / "replay_lowdata"
SIZES = {"50 E2E pairs": "50", "200 E2E pairs": "200"}


def test_the_low_data_table_equals_the_stored_report():
    head, rows = table("BLEU x 100 | 50 E2E pairs")
    assert head[1:] == list(SIZES)
    summary = list(csv.DictReader(open(LOWDATA / "summary.csv")))
    tests = [r for r in csv.DictReader(open(LOWDATA / "significance.csv")) if r["metric"] == "test/BLEU"]
    for col, name in enumerate(head[1:], start=1):
        size = SIZES[name]
        for label, key in (("PREFIX", "prefix_static"), ("FT", "ft")):
            r = next(x for x in summary if x["row"] == key and x["lowres.size"] == size)
            mean, std = float(r["test/BLEU mean"]), float(r["test/BLEU std"])
            assert rows[label][col] == f"{mean * 100:.1f} ± {std * 100:.1f} (n = {r['n']})", (name, label)
        t = [x for x in tests if x["row"] == "ft" and x["lowres.size"] == size]
        assert len(t) == 1, f"{name}: {len(t)} comparisons in {LOWDATA / 'significance.csv'}"
        check_cell(rows["FT - PREFIX"][col], t[0], f"FT - PREFIX / {name}")


# docs/results.md quotes the paired tests of each study: a table after `<!-- significance: results/replay/<study> -->`
# holds rows of that study's significance.md, verbatim (either of its two tables), never retyped
RESULTS = ROOT / "docs" / "results.md"
MARKER = re.compile(r"^<!-- significance: (?P<folder>\S+) -->$")


def quoted_tables(text: str) -> list[tuple[str, int, list[str]]]:
    """Each marked table of a markdown text: the folder it quotes, the marker's line number, its lines."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if m:
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    if rows:
                        break
                    continue
                rows.append(row)
            out.append((m["folder"], i + 1, rows))
    return out


def quote_errors(text: str, where: str = "docs/results.md") -> list[str]:
    """What in a text's marked tables is not in the stored significance.md it names."""
    errors = []
    for folder, line, rows in quoted_tables(text):
        stored = (ROOT / folder / "significance.md").read_text().splitlines()
        if len(rows) < 3:
            errors.append(f"{where}:{line}: no table after the marker")
            continue
        if rows[0] not in stored or rows[1] not in stored:
            errors.append(f"{where}:{line}: not a header of {folder}/significance.md")
        errors += [f"{where}:{line}: {row!r} is not a row of {folder}/significance.md" for row in rows[2:]
                   if row not in stored]
    return errors


def test_the_quoted_significance_tables_equal_the_stored_reports():
    text = RESULTS.read_text()
    assert len(quoted_tables(text)) >= 11, "docs/results.md quotes fewer studies' paired tests than it did"
    assert quote_errors(text) == []


def test_a_retyped_row_is_caught():
    """The check fails on a quoted row whose verdict was edited by hand, naming the marker's line."""
    folder = "results/replay/replay_lowdata"
    stored = (ROOT / folder / "significance.md").read_text().splitlines()
    head = next(i for i, line in enumerate(stored) if line.startswith("| row |"))
    row = stored[head + 2]
    edited = row.replace("differs (p < 0.05)", "not separable") if "differs" in row else row.replace(
        "not separable", "differs (p < 0.05)")
    assert edited != row
    text = "\n".join(["intro", f"<!-- significance: {folder} -->", "", *stored[head:head + 2], row, ""])
    assert quote_errors(text) == []
    errors = quote_errors(text.replace(row, edited))
    assert errors == [f"docs/results.md:2: {edited!r} is not a row of {folder}/significance.md"]
