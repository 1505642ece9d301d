"""The documentation against the code it describes (fast: no model, no training, no network).

* README's two commands are Makefile targets, and `make bench` runs benchmarks/headline.py;
* every command of the CLI has its page in docs/commands, and every option its --help shows is on it;
* every relative link (and #anchor) in README.md and docs/ resolves;
* README stays short;
* docs/BENCHMARKS.md starts with the headline table between its markers, headline.py --check passes and
  --dry-run names a command for every row, and the rows that come from committed JSON equal what
  headline.py makes of that JSON;
* README's Layout picture has the ranks and the order of tests/test_layering.py.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCHMARKS = DOCS / "BENCHMARKS.md"
HEADLINE = ROOT / "benchmarks" / "headline.py"
README_MAX_LINES = 180


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


headline = load("deebert_headline", HEADLINE)


def section(text: str, title: str) -> str:
    """The body of the '## title' section of a markdown text (up to the next '## ')."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def code_blocks(text: str) -> list:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


# ------------------------------------------------------------------------------------------------
# README and Makefile
# ------------------------------------------------------------------------------------------------
def make_targets() -> dict:
    """{target: recipe lines} of the Makefile."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z][\w.-]*):(?!=)", line)
        if m:
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


def test_readmes_two_commands_are_makefile_targets():
    blocks = code_blocks(section(README.read_text(), "Two commands"))
    assert blocks, "README's 'Two commands' section holds no command block"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands
    targets = make_targets()
    for c in commands:
        assert c.split()[1] in targets, f"README's `{c}` is no Makefile target"
    assert any("pytest" in r for r in targets["test"]), targets["test"]
    assert any("deebert finetune" in r for r in targets["demo"]), targets["demo"]
    assert "make test" in (ROOT / ".ci" / "run").read_text(), "CI no longer runs README's test command"
    assert any("benchmarks/headline.py" in r for r in targets.get("bench", [])), "`make bench` must run benchmarks/headline.py"


def test_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference text to docs/"


# ------------------------------------------------------------------------------------------------
# the command reference
# ------------------------------------------------------------------------------------------------
def cli_commands() -> dict:
    import typer

    from deebert_cli.cli.app import app
    return typer.main.get_command(app).commands


def help_options(name: str) -> list:
    """The long options `deebert NAME --help` lists (both names of a --x/--no-x flag), --help aside."""
    from typer.testing import CliRunner

    from deebert_cli.cli.app import app
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    opts = []
    _, found, options = result.output.partition("\nOptions:\n")  # the description above may wrap onto a '--x'
    assert found, result.output
    for line in options.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)  # an option's declaration, not a wrapped help line
        if m:
            opts += [o for o in re.findall(r"--[a-z0-9][a-z0-9-]*", m.group(1)) if o != "--help"]
    return opts


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_has_a_page_with_every_option():
    commands = cli_commands()
    assert len(commands) >= 8, sorted(commands)
    problems = []
    for name, command in sorted(commands.items()):
        page = DOCS / "commands" / f"{name}.md"
        if not page.is_file():
            problems.append(f"deebert {name}: no page docs/commands/{name}.md")
            continue
        text = page.read_text()
        if f"deebert {name}" not in text.splitlines()[0]:
            problems.append(f"docs/commands/{name}.md: its title does not name `deebert {name}`")
        shown = help_options(name)
        declared = {o for p in command.params if not getattr(p, "hidden", False)
                    for o in [*p.opts, *getattr(p, "secondary_opts", [])] if o.startswith("--") and o != "--help"}
        assert set(shown) == declared, f"deebert {name} --help shows {sorted(shown)}, the command declares {sorted(declared)}"
        problems += [f"docs/commands/{name}.md: no word of {o} (deebert {name} --help lists it)"
                     for o in shown if not mentions(text, o)]
    assert not problems, "\n".join(problems)


def test_the_option_matcher_tells_options_apart():
    assert mentions("use `--thresholds 0.1,0.2`", "--thresholds")
    assert not mentions("use `--thresholds 0.1,0.2`", "--threshold")
    assert not mentions("--no-group-by-length", "--group-by-length")


def test_readme_and_the_index_link_every_command_page():
    names = sorted(cli_commands())
    readme, index = README.read_text(), (DOCS / "commands" / "README.md").read_text()
    for name in names:
        assert f"(docs/commands/{name}.md)" in readme, f"README's Documentation list lacks docs/commands/{name}.md"
        assert f"({name}.md)" in index, f"docs/commands/README.md lacks {name}.md"


# ------------------------------------------------------------------------------------------------
# links
# ------------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(text: str) -> list:
    """Link targets of a markdown text, outside fenced code and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def broken_links(path: Path, text: str) -> list:
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in headline.anchors(dest.read_text()):
            problems.append(f"{path.relative_to(ROOT)}: link to {target}: no heading #{anchor} in {dest.name}")
    return problems


def markdown_files() -> list:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def test_every_relative_link_resolves():
    files = markdown_files()
    assert len(files) >= 12, files
    problems = [p for f in files for p in broken_links(f, f.read_text())]
    assert not problems, "\n".join(problems)


def test_the_link_checker_finds_a_broken_link_and_a_missing_anchor():
    fake = DOCS / "commands" / "fake.md"
    text = "[a](predict.md) [b](nothere.md) [c](../BENCHMARKS.md#no-such-heading) `[d](ignored.md)` [e](https://x.y/z)"
    problems = broken_links(fake, text)
    assert len(problems) == 2 and "nothere.md" in problems[0] and "no-such-heading" in problems[1], problems


# ------------------------------------------------------------------------------------------------
# BENCHMARKS.md and its headline
# ------------------------------------------------------------------------------------------------
def test_benchmarks_starts_with_the_headline_table():
    text = BENCHMARKS.read_text()
    assert text.startswith("# Benchmarks\n"), text[:40]
    first_section = text.index("\n## ")
    assert text.index(headline.START) < text.index(headline.END) < first_section
    assert headline.check(text) == []


def test_headline_check_passes_and_fails_on_a_broken_table(tmp_path):
    p = subprocess.run([sys.executable, str(HEADLINE), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    text = BENCHMARKS.read_text()
    row = next(r for r in headline.ROWS if r.label.startswith("Serving"))
    line = next(x for x in text.splitlines() if x.startswith(f"| {row.label} |"))
    broken = {
        "no markers": text.replace(headline.START, ""),
        "a row gone": text.replace(line + "\n", ""),
        "a dead anchor": text.replace(line, line.replace("(#serving-deebert-serve)", "(#nowhere)")),
        "no command": text.replace(line, line.replace("`benchmarks/bench_serve.py`", "bench_serve")),
        "a cell short": text.replace(line, line.replace(" | 2 CPU cores", "", 1)),
    }
    for why, bad in broken.items():
        f = tmp_path / "BENCHMARKS.md"
        f.write_text(bad)
        assert headline.main(["--check", "--doc", str(f)]) == 1, f"--check passed a table with {why}"


def test_headline_dry_run_names_a_command_for_every_row(tmp_path):
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, str(HEADLINE), "--dry-run", "--work", str(work)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not work.exists(), "--dry-run created its work folder: it must run nothing"
    rows = {}
    current = None
    for line in p.stdout.splitlines():
        if line.startswith("ROW: "):
            current = rows.setdefault(line[5:], [])
        elif line.startswith("  $ ") and current is not None:
            current.append(line[4:])
    s, e = headline.block(BENCHMARKS.read_text())
    labels = [headline.cells(x)[0] for x in headline.table_lines(BENCHMARKS.read_text()[s:e])[2:]]
    assert labels and set(labels) == set(rows), (labels, sorted(rows))
    for label in labels:
        assert rows[label], f"no command for row '{label}'"
        assert all("benchmarks/" in c or "deebert_cli" in c for c in rows[label]), rows[label]


def table_row(label: str) -> str:
    text = BENCHMARKS.read_text()
    return next(x for x in text.splitlines() if x.startswith(f"| {label} |"))


def test_the_rows_from_committed_json_are_what_headline_makes_of_it():
    """The GPU and guarantee rows are headline.py's reading of docs/bench_gpu_h200.json and
    docs/guarantee_*.json: no figure typed by hand."""
    results = {"gpu": json.loads((DOCS / "bench_gpu_h200.json").read_text())}
    checked = 0
    for r in headline.ROWS:
        if r.jobs == ("gpu",) or set(r.jobs) == set(headline.GUARANTEE_JOBS):
            assert headline.format_row(r, results, "2 CPU cores") == table_row(r.label)
            checked += 1
    assert checked == 5


SERVE_OUT = {  # bench_serve.py's table, as it prints it (the Serving section's run at 64 clients)
    "serve-torch": [("(a) full depth, batching", 210.7, 302.5, 464.0, 6.00), ("(b) threshold, batching", 316.7, 188.5, 372.8, 3.19),
                    ("(c) threshold, each alone", 176.7, 356.6, 452.6, 3.19)],
    "serve-onnx": [("(a) full depth, batching", 425.4, 146.5, 193.4, 6.00), ("(b) threshold, batching", 634.1, 95.3, 178.2, 3.19),
                   ("(c) threshold, each alone", 455.9, 136.5, 180.3, 3.19)],
}
RAY_OUT = [("deebert predict", 20000, 81.9, 244.2), ("deebert predict (1 thread)", 20000, 117.6, 170.0),
           ("predict-dataset", 20000, 80.5, 248.6), ("predict-dataset (small)", 500, 16.8, 29.8)]


def runtime_json() -> dict:
    """bench_runtime.py's JSON with the ONNX Runtime section's figures (texts/s, accuracy)."""
    rows = {  # name: (b1 ex/s, b32 ex/s, b1 accuracy, b32 accuracy)
        "transformers eager (torch)": (129, 297, .8034, .8034), "ORT classifier fp32": (363, 545, .8034, .8034),
        "ORT classifier int8": (708, 1023, .8025, .7949), "deebert torch, threshold 0": (120, 277, .8034, .8034),
        "deebert torch, threshold 0.7": (231, 464, .8034, .8034), "deebert onnx fp32, threshold 0": (319, 526, .8034, .8034),
        "deebert onnx fp32, threshold 0.7": (588, 904, .8034, .8034), "deebert onnx int8, threshold 0": (788, 1000, .7996, .7958),
        "deebert onnx int8, threshold 0.7": (1291, 1672, .8006, .7940)}
    results = {str(bs): {k: {"ex_per_s": v[i], "accuracy": v[2 + i]} for k, v in rows.items()} for i, bs in enumerate((1, 32))}
    ratios = {"batch 32, fp32": {"speedup": 1.54}, "batch 32, fp32, refill": {"speedup": 1.60},
              "batch 32, int8": {"speedup": 1.43}, "batch 32, int8, refill": {"speedup": 1.43}}
    cold = {"deebert predict --runtime onnx": {"median_s": 0.36}, "deebert predict --runtime onnx --onnx-precision int8":
            {"median_s": 0.33}, "deebert predict (torch runtime)": {"median_s": 3.66}}
    return {"threshold": 0.7, "results": results, "ratios": ratios, "cold_start": cold}


def test_headline_reads_what_the_benchmarks_print_and_rewrites_a_valid_table():
    results = {"runtime": runtime_json(), "ray": headline.parse_ray(
        "\n".join(f"{c:28s} {n:7d} {s:8.1f} {r:8.1f}" for c, n, s, r in RAY_OUT))}
    for job, rows in SERVE_OUT.items():  # the f-string of bench_serve.py
        results[job] = headline.parse_serve("header\n" + "\n".join(
            f"{name:28s} {64:7d} {rps:8.1f} {p50:8.1f} {p99:8.1f} {ex:9.2f}" for name, rps, p50, p99, ex in rows))
    new = {}
    for r in headline.ROWS:
        if all(j in results for j in r.jobs):
            new[r.label] = headline.format_row(r, results, "2 CPU cores")
            assert new[r.label] == table_row(r.label), f"{r.label}:\n{new[r.label]}\n{table_row(r.label)}"
    assert len(new) == 11
    results["analyze"] = {"test": {"at_recommended": {"threshold": 0.4, "layer_saving": 0.5113, "accuracy_change": 0.0945},
                                   "at_guaranteed": {"threshold": 0.155, "layer_saving": 0.3, "accuracy_change": -0.1}}}
    movie = next(r for r in headline.ROWS if r.jobs == ("analyze",))
    new[movie.label] = headline.format_row(movie, results, "4 CPU cores")
    text = headline.rewrite(BENCHMARKS.read_text(), new, "4 CPU cores", "deebert-checkpoint", ["the GPU rows (no CUDA)"])
    assert headline.check(text) == []
    assert "51.13% fewer layers at +0.09 points (test, threshold 0.4, point estimate)" in text
    assert table_row("GPU, batch 1, bf16 / fp16: early exit at the stored threshold") in text  # kept as it was
    with pytest.raises(ValueError):
        headline.parse_serve("no table here")


def test_headline_never_replaces_a_folder_it_did_not_make(tmp_path):
    """make bench copies the checkpoint to WORK/ckpt: a ckpt folder of the user's own, or the checkpoint
    itself lying there, is refused and kept; a copy the script made itself is replaced by the next run."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "highway.safetensors").write_text("weights 1")
    theirs = tmp_path / "theirs"
    (theirs / "ckpt").mkdir(parents=True)
    (theirs / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(headline.UsageError, match="did not make"):
        headline.prepare_work(ck, theirs)
    assert (theirs / "ckpt" / "notes.txt").read_text() == "mine"

    inside = tmp_path / "w"
    (inside / "ckpt").mkdir(parents=True)
    (inside / "ckpt" / "highway.safetensors").write_text("the original")
    with pytest.raises(headline.UsageError, match="--checkpoint"):
        headline.prepare_work(inside / "ckpt", inside)
    assert (inside / "ckpt" / "highway.safetensors").read_text() == "the original"

    work = tmp_path / "bench"
    assert headline.prepare_work(ck, work) == work / "ckpt"
    (ck / "highway.safetensors").write_text("weights 2")
    headline.prepare_work(ck, work)  # its own copy: replaced
    assert (work / "ckpt" / "highway.safetensors").read_text() == "weights 2"


def test_headline_user_errors_are_one_line_exit_2(tmp_path, capsys):
    for argv, needle in ((["--check", "--doc", str(tmp_path / "none.md")], "--doc"), (["--dry-run", "--only", "nope"], "--only"),
                         (["--check", "--timeout", "0"], "--timeout"), (["--checkpoint", str(tmp_path)], "checkpoint")):
        assert headline.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, (argv, err)


# ------------------------------------------------------------------------------------------------
# the layer picture
# ------------------------------------------------------------------------------------------------
def test_readmes_layout_picture_has_the_layers_of_test_layering():
    layering = load("deebert_test_layering", ROOT / "tests" / "test_layering.py")
    body = section(README.read_text(), "Layout")
    assert "tests/test_layering.py" in body
    picture = code_blocks(body)[0]
    ranks, may_import = {}, {}
    for line in picture.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\S+)\s+(.*)$", line)
        if m:
            part = m.group(2).removeprefix("core/").removesuffix(".py")
            ranks[part] = int(m.group(1))
            may_import[part] = re.split(r"\s{2,}", m.group(3).strip())[-1]  # the last column
    expected = {**layering.RANKS, "cli": layering.TOP}
    assert ranks == expected, f"README's Layout picture ranks {ranks}, tests/test_layering.py {expected}"
    order = re.search(r"^order: (.*)$", picture, re.M)
    assert order and order.group(1).strip() == layering._order(), (order and order.group(1), layering._order())
    for part, targets in may_import.items():  # what a row says it may import sits strictly below it
        for other in re.findall(r"[a-z_]+", targets):
            if other in layering.RANKS and other != part:
                assert layering.RANKS[other] < ranks[part], f"Layout: {part} (rank {ranks[part]}) 'may import' {other}"


def test_the_changelog_has_one_unreleased_section():
    assert (ROOT / "CHANGELOG.md").read_text().count("## [Unreleased]") == 1
