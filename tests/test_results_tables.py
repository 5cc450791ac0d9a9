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


def test_the_memory_table_equals_the_stored_report():
    head, rows = table("BLEU x 100")
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
            t, m = tests[key], CELL.match(cell)
            assert m, f"{label} / {name}: {cell!r} is not in the table's format"
            plus, minus, _ = t["signs"].split("/")
            assert m["delta"] == x100(t["delta"]) and (m["low"], m["high"]) == (x100(t["low"]), x100(t["high"]))
            assert m["p"] == f"{float(t['p_bootstrap']):.3f}" and m["p_pairs"] == f"{float(t['p_pairs']):.3f}"
            assert (m["plus"], m["minus"]) == (plus, minus)
            assert m["verdict"] == t["verdict"], f"{label} / {name}: the README says {m['verdict']!r}"
            checked += 1
    assert checked == 4  # three rows against memory, APT against the static prefix
