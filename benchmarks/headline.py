"""Regenerate the headline table of docs/BENCHMARKS.md: rerun the benchmarks behind its rows, read their JSON
or printed tables, and rewrite the table between the ``<!-- headline:start -->`` and ``<!-- headline:end -->``
markers (``make bench`` runs this).

    python benchmarks/headline.py [--checkpoint deebert-checkpoint]   # rerun what can run here, rewrite the table
    python benchmarks/headline.py --dry-run    # the command behind every row, in run order; runs nothing
    python benchmarks/headline.py --check      # the table is well-formed and every row names its source

The checkpoint (by default the one ``make demo`` writes) is copied into ``--work`` first, since
bench_runtime.py writes its ONNX export into the checkpoint it is given. Sizes are cut to run in minutes
on 2 CPUs; ``--extra JOB "ARGS"`` appends arguments to one job's command (a later flag wins, so
``--extra serve-torch "--n 1058 --repeats 2"`` restores the sizes of the Serving section). Rows whose
command cannot run here keep their figures: the GPU rows without CUDA, the guarantee rows unless
``--guarantee-movie STAGE1 POOL`` / ``--guarantee-sms STAGE1 POOL`` name a stage-1 checkpoint and a pool of
held-out labelled texts (see the guarantee section of docs/BENCHMARKS.md), and any row whose command
failed (its log is in ``--work``).

Only the standard library is imported here, so ``--dry-run`` and ``--check`` cost nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
HEADER = ("figure", "deebert", "beside it", "machine", "source")
MOVIE = ROOT / "deebert_cli" / "data" / "movie_snippets"

ONNX_CPU = "[ONNX Runtime](#onnx-runtime-against-pytorch-on-a-cpu)"
GUARANTEE = "[Guarantee](#thresholds-with-a-guarantee-validity-and-cost)"
GPU = "[On a GPU](#on-a-gpu-nvidia-h200)"


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """A wrong flag or path: one line on stderr, exit status 2."""


def read_doc(path) -> str:
    """The text of --doc, or a UsageError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--doc '{path}' cannot be read: {getattr(e, 'strerror', None) or e}") from None


WORK_MARK = ".deebert-bench"  # marks a --work folder this script made (its ckpt copy may be replaced)


def prepare_work(ck: Path, work: Path) -> Path:
    """Copy the checkpoint to WORK/ckpt and return that path. A ckpt folder already there is replaced only
    when this script made it; --checkpoint inside it is refused (the copy would delete the original)."""
    target = work / "ckpt"
    if target.resolve() == ck.resolve() or target.resolve() in ck.resolve().parents:
        raise UsageError(f"--work '{work}': its ckpt folder is where --checkpoint '{ck}' lies; give another --work")
    if target.exists() and not (work / WORK_MARK).is_file():
        raise UsageError(f"--work '{work}' already holds a ckpt folder this script did not make; give another --work")
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / WORK_MARK).write_text("made by benchmarks/headline.py; its ckpt folder is a copy it may replace\n")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ck, target)
    except OSError as e:
        raise UsageError(f"--work '{work}' cannot be written: {e.strerror or e}") from None
    return target


@dataclass
class Job:
    name: str
    argv: list
    output: str | None = None  # a JSON file the command writes; None: its stdout is parsed
    when: str | None = None  # None: always; "cuda": only with a CUDA GPU; "pool": only with --guarantee-*
    note: str = ""


def jobs(args) -> dict:
    """Every job, in run order, with the sizes `make bench` uses."""
    py, work = "python", Path(args.work)
    ck = str(work / "ckpt")
    g_movie = args.guarantee_movie or ("STAGE1", "POOL.jsonl")
    g_sms = args.guarantee_sms or ("STAGE1", "POOL.jsonl")
    out = [
        Job("runtime", [py, "benchmarks/bench_runtime.py", "--checkpoint", ck, "--repeats", "2", "--cold-start", "3",
                        "--work", str(work / "plain"), "--json", str(work / "bench_runtime.json")],
            output=str(work / "bench_runtime.json")),
        Job("analyze", [py, "-m", "deebert_cli", "analyze", "--checkpoint", ck, "--json", str(work / "analyze.json"),
                        "--examples", "0", "--timing-repeats", "1", "--no-layers", "--device", "cpu"],
            output=str(work / "analyze.json")),
        Job("serve-torch", [py, "benchmarks/bench_serve.py", "--checkpoint", ck, "--n", "400", "--clients", "64",
                            "--repeats", "1"]),
        Job("serve-onnx", [py, "benchmarks/bench_serve.py", "--checkpoint", ck, "--n", "400", "--clients", "64",
                           "--repeats", "1", "--runtime", "onnx"], note="uses the export that the runtime job wrote"),
        Job("ray", [py, "benchmarks/bench_ray.py", "--checkpoint", ck, "--n", "5000", "--small", "500", "--repeats", "1"]),
        Job("gpu", [py, "benchmarks/bench_gpu.py", "--checkpoint", ck, "--data", str(args.data), "--b1-n", "400",
                    "--repeats", "2", "--json", str(work / "bench_gpu.json")],
            output=str(work / "bench_gpu.json"), when="cuda",
            note="only on a CUDA machine; without one the GPU rows keep their figures"),
        Job("guarantee-movie", [py, "benchmarks/bench_guarantee.py", "--checkpoint", g_movie[0], "--pool", g_movie[1],
                                "--cache", str(work / "g-movie.npz"), "--sizes", "500,1000,2500",
                                "--splits", "300", "--name", "movie reviews", "--json", str(work / "guarantee_movie.json")],
            output=str(work / "guarantee_movie.json"), when="pool",
            note="only with --guarantee-movie STAGE1 POOL; else docs/guarantee_movie.json is what the rows show"),
        Job("guarantee-sms", [py, "benchmarks/bench_guarantee.py", "--checkpoint", g_sms[0], "--pool", g_sms[1],
                              "--cache", str(work / "g-sms.npz"), "--sizes", "500,1000,1500",
                              "--splits", "300", "--name", "SMS spam", "--json", str(work / "guarantee_sms.json")],
            output=str(work / "guarantee_sms.json"), when="pool",
            note="only with --guarantee-sms STAGE1 POOL; else docs/guarantee_sms.json is what the rows show"),
    ]
    extra = {}
    for name, more in args.extra or []:
        extra.setdefault(name, []).extend(shlex.split(more))
    unknown = set(extra) - {j.name for j in out}
    if unknown:
        raise UsageError(f"--extra names no job: {', '.join(sorted(unknown))} (jobs: {', '.join(j.name for j in out)})")
    for j in out:
        j.argv += extra.get(j.name, [])
    return {j.name: j for j in out}


# ------------------------------------------------------------------------------------------------
# reading what the commands printed
# ------------------------------------------------------------------------------------------------
SERVE_LINE = re.compile(r"^(\(a\) full depth, batching|\(b\) threshold, batching|\(c\) threshold, each alone)\s+(\d+)"
                        r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
RAY_LINE = re.compile(r"^(deebert predict \(1 thread\)|deebert predict|predict-dataset \(small\)|predict-dataset)\s+(\d+)"
                      r"\s+([\d.]+)\s+([\d.]+)\s*$")


def parse_serve(text: str) -> dict:
    """bench_serve.py's table -> {(configuration, clients): {rps, p50, p99, mean_exit}}."""
    out = {}
    for line in text.splitlines():
        m = SERVE_LINE.match(line.strip())
        if m:
            out[m.group(1), int(m.group(2))] = dict(zip(("rps", "p50", "p99", "mean_exit"), map(float, m.groups()[2:])))
    if not out:
        raise ValueError("no result table in bench_serve.py's output")
    return out


def parse_ray(text: str) -> dict:
    """bench_ray.py's table -> {command: {lines, seconds, rows_s}}."""
    out = {}
    for line in text.splitlines():
        m = RAY_LINE.match(line.strip())
        if m:
            out[m.group(1)] = {"lines": int(m.group(2)), "seconds": float(m.group(3)), "rows_s": float(m.group(4))}
    if "predict-dataset" not in out or "deebert predict" not in out:
        raise ValueError("no result table in bench_ray.py's output")
    return out


# ------------------------------------------------------------------------------------------------
# the rows: what each shows, from which job
# ------------------------------------------------------------------------------------------------
def rate(x: float) -> str:
    return f"{round(x):,}"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _runtime(data: dict, bs: int, name: str) -> dict:
    return data["results"][str(bs)][name]


def cpu_early_exit(bs: int, runtime: str) -> Callable:
    """ONNX int8 / fp32 or torch at the recommended threshold, against full depth and the plain classifiers."""
    def fmt(d: dict) -> tuple:
        t = f"threshold {d['threshold']:g}"
        at = _runtime(d, bs, f"deebert {runtime}, {t}")
        zero = _runtime(d, bs, f"deebert {runtime}, threshold 0")
        eager = _runtime(d, bs, "transformers eager (torch)")
        prec = runtime.split()[-1]  # int8, fp32, torch
        peers = [f"{prec} full depth {rate(zero['ex_per_s'])}/s"]
        if runtime != "torch":
            peers.append(f"ORT {prec} classifier {rate(_runtime(d, bs, f'ORT classifier {prec}')['ex_per_s'])}/s")
        peers.append(f"transformers eager {rate(eager['ex_per_s'])}/s ({pct(eager['accuracy'])})")
        return f"{rate(at['ex_per_s'])} texts/s ({pct(at['accuracy'])})", "; ".join(peers)
    return fmt


def refill_vs_shrink(d: dict) -> tuple:
    r = d["ratios"]
    return (f"refill {r['batch 32, fp32, refill']['speedup']:.2f}x (fp32), {r['batch 32, int8, refill']['speedup']:.2f}x "
            f"(int8) the ORT classifier",
            f"shrink {r['batch 32, fp32']['speedup']:.2f}x (fp32), {r['batch 32, int8']['speedup']:.2f}x (int8)")


def cold_start(d: dict) -> tuple:
    c = d["cold_start"]
    return (f"{c['deebert predict --runtime onnx']['median_s']:.2f} s "
            f"(int8 {c['deebert predict --runtime onnx --onnx-precision int8']['median_s']:.2f} s)",
            f"torch runtime {c['deebert predict (torch runtime)']['median_s']:.2f} s")


def movie_saving(d: dict) -> tuple:
    test = d["test"]
    rec, g = test["at_recommended"], test.get("at_guaranteed")
    beside = (f"guaranteed threshold {g['threshold']:g}: {pct(g['layer_saving'])} fewer layers at "
              f"{g['accuracy_change']:+.2f} points (test)") if g else "no threshold certified on the evaluation split"
    return (f"{pct(rec['layer_saving'])} fewer layers at {rec['accuracy_change']:+.2f} points (test, threshold "
            f"{rec['threshold']:g}, point estimate)", beside)


def serving(d: dict) -> tuple:
    clients = max(c for _, c in d)
    a, b, c = (d[name, clients] for name in ("(a) full depth, batching", "(b) threshold, batching",
                                             "(c) threshold, each alone"))
    return (f"{b['rps']:.1f} req/s, p99 {b['p99']:.1f} ms",
            f"full depth {a['rps']:.1f} req/s (p99 {a['p99']:.1f} ms); each request alone {c['rps']:.1f} req/s")


def ray(d: dict) -> tuple:
    r = d["predict-dataset"]
    one = d.get("deebert predict (1 thread)")
    beside = f"deebert predict {d['deebert predict']['rows_s']:.1f} rows/s"
    return (f"{r['rows_s']:.1f} rows/s ({r['lines']:,} lines)",
            beside + (f"; one thread {one['rows_s']:.1f} rows/s" if one else ""))


def gpu_fp32(d: dict) -> tuple:
    t = f"threshold {d['threshold']:g}"
    r = d["results"]
    sizes = sorted({int(k.split(" b")[1]) for k in r if k.startswith("fp32 b")})
    get = lambda key: " / ".join(rate(r[f"fp32 b{bs}"][key]["ex_per_s"]) for bs in sizes)
    return f"{get(t)} texts/s", f"transformers eager {get('eager')}; threshold 0: {get('threshold 0')}"


def gpu_half_b1(d: dict) -> tuple:
    t = f"threshold {d['threshold']:g}"
    r = d["results"]
    get = lambda key: " / ".join(rate(r[f"{p} b1"][key]["ex_per_s"]) for p in ("bf16", "fp16"))
    return f"{get(t)} texts/s", f"transformers eager {get('eager')}"


def _names(d: dict) -> str:
    return d.get("name", "?")


def _kept(g: dict, risk: str, eps: float) -> str:
    """The smallest calibration size whose guarantee kept >= 80% of the point estimate's saving, as a phrase."""
    rows = _budget_rows(g, risk, eps)
    r = _size_to_bring(g, risk, eps)
    if r["saving_ratio"] >= 0.8:
        return f"{round(100 * r['saving_ratio'])}% with {r['calibration']:,} texts ({_names(g)})"
    at = {r["calibration"]: r for r in rows}
    big = rows[-1]
    mid = at.get(1000)
    shown = ([f"{round(100 * mid['saving_ratio'])}% at 1,000"] if mid is not None and mid is not big else []) + \
            [f"{round(100 * big['saving_ratio'])}% at {big['calibration']:,}"]
    return f"under 80% up to {big['calibration']:,} texts ({_names(g)}: {', '.join(shown)})"


def _budget_rows(g: dict, risk: str, eps: float) -> list:
    """bench_guarantee.py's rows for one risk and budget, by calibration size."""
    return sorted((r for r in g["results"] if r["risk"] == risk and abs(r["epsilon"] - eps) < 1e-12),
                  key=lambda r: r["calibration"])


def _size_to_bring(g: dict, risk: str, eps: float) -> dict:
    """The row of the smallest calibration size that kept >= 80% of the saving, else the largest size's."""
    rows = _budget_rows(g, risk, eps)
    return next((r for r in rows if r["saving_ratio"] >= 0.8), rows[-1])


def sms_saving(movie: dict, sms: dict) -> tuple:
    r = _size_to_bring(sms, "accuracy_drop", 0.01)
    return (f"{100 * r['guaranteed']['saving_mean']:.1f}% fewer layers, guaranteed (1-point budget, "
            f"{r['calibration']:,} calibration texts)", f"point estimate {100 * r['point']['saving_mean']:.1f}%")


def validity(movie: dict, sms: dict) -> tuple:
    def worst(g):  # the whole pool's risk as the truth (calibration drawn with replacement): no test-part noise
        return max(r["guaranteed_pop"]["violations"] for r in g["results"])

    def span(g):
        v = [r["point"]["violations"] for r in g["results"]]
        return f"{min(v):.2f} to {max(v):.2f} ({_names(g)})"
    delta = movie["results"][0]["delta"]
    return (f"at most {worst(movie):.3f} ({_names(movie)}), {worst(sms):.3f} ({_names(sms)}), the pool as the truth; "
            f"delta {delta:g}",
            f"point estimate: {span(movie)}, {span(sms)}")


def cost(movie: dict, sms: dict) -> tuple:
    return (f"2% disagreement: {_kept(movie, 'disagreement', 0.02)}; {_kept(sms, 'disagreement', 0.02)}",
            f"1 point: {_kept(movie, 'accuracy_drop', 0.01)}; {_kept(sms, 'accuracy_drop', 0.01)}")


@dataclass
class Row:
    label: str
    jobs: tuple  # the jobs whose output the row reads (all of them, or, for the guarantee rows, any)
    fmt: Callable
    source: str
    machine: str = "cpu"  # "cpu": this machine's cores; "gpu": the GPU named in the JSON


GUARANTEE_JOBS = ("guarantee-movie", "guarantee-sms")
RUNTIME_SOURCE = f"{ONNX_CPU}, `benchmarks/bench_runtime.py`"
GUARANTEE_SOURCE = f"{GUARANTEE}, `benchmarks/bench_guarantee.py`"
CPU_RUNTIMES = (("ONNX Runtime int8", "onnx int8"), ("ONNX Runtime fp32", "onnx fp32"), ("PyTorch", "torch"))

ROWS = [
    *(Row(f"CPU, batch {bs}: {name}, early exit", ("runtime",), cpu_early_exit(bs, runtime), RUNTIME_SOURCE)
      for name, runtime in CPU_RUNTIMES for bs in (1, 32)),
    Row("CPU, batch 32: refill engine against shrink", ("runtime",), refill_vs_shrink, RUNTIME_SOURCE),
    Row("Cold start, one line: ONNX Runtime", ("runtime",), cold_start, RUNTIME_SOURCE),
    Row("Layer saving, movie reviews", ("analyze",), movie_saving, "[make demo](#make-demo-end-to-end), `deebert analyze`"),
    Row("Layer saving, SMS spam", GUARANTEE_JOBS, sms_saving, GUARANTEE_SOURCE),
    Row("Serving, 64 clients: PyTorch, batching across requests", ("serve-torch",), serving,
        "[Serving](#serving-deebert-serve), `benchmarks/bench_serve.py`"),
    Row("Serving, 64 clients: ONNX fp32, batching across requests", ("serve-onnx",), serving,
        "[Serving](#serving-deebert-serve), `benchmarks/bench_serve.py --runtime onnx`"),
    Row("Corpora: predict-dataset on Ray Data", ("ray",), ray,
        "[Ray Data](#corpora-on-ray-data-deebert-predict-dataset), `benchmarks/bench_ray.py`"),
    Row("GPU, fp32, batch 1 / 32 / 256: early exit at the stored threshold", ("gpu",), gpu_fp32,
        f"{GPU}, `benchmarks/bench_gpu.py`", machine="gpu"),
    Row("GPU, batch 1, bf16 / fp16: early exit at the stored threshold", ("gpu",), gpu_half_b1,
        f"{GPU}, `benchmarks/bench_gpu.py`", machine="gpu"),
    Row("Guarantee validity: share of 300 splits over budget", GUARANTEE_JOBS, validity, GUARANTEE_SOURCE),
    Row("Guarantee cost: share of the point estimate's saving kept", GUARANTEE_JOBS, cost, GUARANTEE_SOURCE),
]
COMMITTED = {"guarantee-movie": ROOT / "docs" / "guarantee_movie.json", "guarantee-sms": ROOT / "docs" / "guarantee_sms.json"}


def format_row(row: Row, results: dict, machine: str) -> str:
    """The table line of ``row`` from its jobs' parsed results ({job: data}); the guarantee rows read the
    committed JSON of a guarantee job that did not run."""
    if set(row.jobs) == set(GUARANTEE_JOBS):
        data = [results[j] if j in results else json.loads(COMMITTED[j].read_text(encoding="utf-8")) for j in row.jobs]
    else:
        data = [results[j] for j in row.jobs]
    deebert, beside = row.fmt(*data)
    if row.machine == "gpu":
        machine = data[0].get("gpu", "GPU")
    return "| " + " | ".join((row.label, deebert, beside, machine, row.source)) + " |"


# ------------------------------------------------------------------------------------------------
# the table in the document
# ------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    s = "".join(ch for ch in s.replace("`", "").replace("*", "") if ch.isalnum() or ch in " -_")
    return s.replace(" ", "-")


def headings(text: str) -> list:
    """The headings of a markdown text (outside fenced code), in order."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if h:
                out.append(h.group(1))
    return out


def anchors(text: str) -> set:
    seen: dict = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def cells(line: str) -> list:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def block(text: str) -> tuple:
    """(start, end) character offsets of the text between the markers; raises ValueError."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one {START} and one {END}, found {text.count(START)} and {text.count(END)}")
    s, e = text.index(START) + len(START), text.index(END)
    if e < s:
        raise ValueError(f"{END} comes before {START}")
    return s, e


def table_lines(inner: str) -> list:
    lines = inner.splitlines()
    idx = [i for i, line in enumerate(lines) if line.lstrip().startswith("|")]
    if not idx:
        raise ValueError("no table between the markers")
    if idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError("more than one table between the markers (or a broken one)")
    return [lines[i] for i in idx]


def check(text: str) -> list:
    """What is wrong with the headline table of ``text`` (a BENCHMARKS.md), as messages; [] when nothing."""
    try:
        s, e = block(text)
        lines = table_lines(text[s:e])
    except ValueError as err:
        return [str(err)]
    problems = []
    first_section = re.search(r"^## ", text, re.M)
    if first_section and first_section.start() < e:
        problems.append("the headline table must come before the first section (## heading)")
    if tuple(cells(lines[0])) != HEADER:
        problems.append(f"header is {cells(lines[0])}, expected {list(HEADER)}")
    if len(lines) < 2 or not re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", lines[1].strip()) or len(cells(lines[1])) != len(HEADER):
        problems.append("the second line must be the separator |---|---|...")
    known = {r.label: r for r in ROWS}
    there = anchors(text)
    labels = []
    for n, line in enumerate(lines[2:], start=3):
        c = cells(line)
        if len(c) != len(HEADER):
            problems.append(f"table line {n}: {len(c)} cells, expected {len(HEADER)}: {line[:80]}")
            continue
        if any(not x for x in c):
            problems.append(f"table line {n}: an empty cell: {line[:80]}")
        label, source = c[0], c[-1]
        labels.append(label)
        if label not in known:
            problems.append(f"table line {n}: row '{label}' is not a row of benchmarks/headline.py (ROWS)")
            continue
        links = re.findall(r"\]\(#([^)\s]+)\)", source)
        if not links:
            problems.append(f"row '{label}': its source names no section (a [name](#anchor) link)")
        for a in links:
            if a not in there:
                problems.append(f"row '{label}': its source links to #{a}, which is no heading of the document")
        commands = re.findall(r"`([^`]+)`", source)
        if not any(x.startswith(("benchmarks/", "deebert ", "make ")) for x in commands):
            problems.append(f"row '{label}': its source names no command (`benchmarks/...`, `deebert ...`, `make ...`)")
        if source != known[label].source:
            problems.append(f"row '{label}': source '{source}' is not the one headline.py writes: '{known[label].source}'")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        problems.append(f"rows appear twice: {dupes}")
    missing = [r.label for r in ROWS if r.label not in labels]
    if missing:
        problems.append(f"rows of headline.py missing from the table: {missing}")
    return problems


def rewrite(text: str, new_rows: dict, machine: str, checkpoint: str, kept: list) -> str:
    s, e = block(text)
    old = {cells(line)[0]: line for line in table_lines(text[s:e])[2:]}
    lines = []
    for r in ROWS:
        lines.append(new_rows.get(r.label) or old.get(r.label)
                     or "| " + " | ".join((r.label, "not measured", "not measured", machine, r.source)) + " |")
    caption = (f"Regenerated by `make bench` (`benchmarks/headline.py`) on {machine} ({platform.machine()}, "
               f"{platform.python_implementation()} {platform.python_version()}) from checkpoint `{checkpoint}`, "
               f"{time.strftime('%Y-%m-%d')}. Each row links to the section that says what it measures and how; "
               "texts/s are over the 1,058 movie-review test texts.")
    if kept:
        caption += " Rows whose command did not run here keep their earlier figures: " + "; ".join(kept) + "."
    body = "\n" + caption + "\n\n" + "| " + " | ".join(HEADER) + " |\n" + "|---" * len(HEADER) + "|\n" + "\n".join(lines) + "\n"
    return text[:s] + body + text[e:]


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def has_cuda() -> bool:
    try:
        p = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True, timeout=120)
        return p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def selected(all_jobs: dict, args) -> list:
    only = set(filter(None, (args.only or "").split(",")))
    skip = set(filter(None, (args.skip or "").split(",")))
    unknown = (only | skip) - set(all_jobs)
    if unknown:
        raise UsageError(f"--only/--skip: no such job: {', '.join(sorted(unknown))} (jobs: {', '.join(all_jobs)})")
    return [j for name, j in all_jobs.items() if (not only or name in only) and name not in skip]


def runnable(job: Job, args, cuda: bool | None) -> str | None:
    """None when ``job`` can run here, else why not."""
    if job.when == "cuda" and not cuda:
        return "no CUDA GPU here"
    if job.when == "pool" and not (args.guarantee_movie if job.name == "guarantee-movie" else args.guarantee_sms):
        return f"no --{job.name} STAGE1 POOL given"
    return None


def command(argv: list) -> list:
    """A job's argv as run: "python" is this interpreter."""
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def shown(argv: list) -> str:
    return " ".join(shlex.quote(a) for a in command(argv))


def dry_run(args) -> None:
    all_jobs = jobs(args)
    chosen = {j.name for j in selected(all_jobs, args)}
    print(f"# nothing is run. First the checkpoint is copied: {shlex.quote(args.checkpoint)} -> "
          f"{shlex.quote(str(Path(args.work) / 'ckpt'))}")
    print(f"# then, for each headline row of {args.doc}, the command behind it (jobs in run order: "
          f"{', '.join(all_jobs)}):")
    for r in ROWS:
        print(f"ROW: {r.label}")
        for name in r.jobs:
            j = all_jobs[name]
            skip = "" if name in chosen else "   [not selected: the row keeps its figures]"
            note = f"   [{j.note}]" if j.note and j.when else ""
            print(f"  $ {shown(j.argv)}{note}{skip}")
    print(f"# then the table between {START} and {END} in {args.doc} is rewritten")


def run_job(job: Job, work: Path, env: dict, timeout: int) -> tuple:
    """Run one job, its stdout and stderr logged under ``work``; (what it measured, None), or (None, why not)."""
    print(f"[{job.name}] $ {shown(job.argv)}", flush=True)
    t0 = time.time()
    log_out, log_err = work / f"{job.name}.out", work / f"{job.name}.err"
    try:
        with open(log_out, "w") as out, open(log_err, "w") as err:
            rc = subprocess.run(command(job.argv), cwd=ROOT, env=env, stdout=out, stderr=err, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc != 0:
        print(f"[{job.name}] failed ({rc}) after {time.time() - t0:.0f} s; log: {log_err}", flush=True)
        return None, f"failed ({rc}; see {log_err})"
    try:
        if job.output:
            result = json.loads(Path(job.output).read_text(encoding="utf-8"))
        elif job.name.startswith("serve"):
            result = parse_serve(log_out.read_text())
        else:
            result = parse_ray(log_out.read_text())
    except (OSError, ValueError, KeyError) as err:
        print(f"[{job.name}] output not readable: {err}", flush=True)
        return None, f"its output could not be read ({err})"
    print(f"[{job.name}] done in {time.time() - t0:.0f} s", flush=True)
    return result, None


def measured_rows(results: dict, why_not: dict, machine: str) -> tuple:
    """({label: new table line} for each row whose jobs ran (a guarantee row: either of its two), [why each
    other row keeps its figures])."""
    new_rows, kept = {}, []
    for r in ROWS:
        ran = [j for j in r.jobs if j in results]
        if (set(r.jobs) == set(GUARANTEE_JOBS) and ran) or (ran and len(ran) == len(r.jobs)):
            try:
                new_rows[r.label] = format_row(r, results, machine)
                continue
            except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError) as err:
                print(f"row '{r.label}': could not be formatted ({err!r}); it keeps its figures", flush=True)
        kept.append(f"{r.label} ({', '.join(why_not.get(j, 'not selected') for j in r.jobs)})")
    return new_rows, kept


def run_jobs(args) -> int:
    ck = Path(args.checkpoint)
    if not (ck / "highway.safetensors").is_file():
        print(f"error: no trained checkpoint at {ck} (no highway.safetensors): run `make demo` first, "
              "or pass --checkpoint", file=sys.stderr)
        return 2
    doc = Path(args.doc)
    problems = check(read_doc(doc))
    if problems:
        print("error: the headline table is broken before the run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    work = Path(args.work)
    prepare_work(ck, work)
    all_jobs = jobs(args)
    cuda = has_cuda() if any(j.when == "cuda" for j in selected(all_jobs, args)) else None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               DEEBERT_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    results, why_not = {}, {}
    for job in selected(all_jobs, args):
        reason = runnable(job, args, cuda)
        if reason:
            print(f"[{job.name}] skipped: {reason}", flush=True)
        else:
            result, reason = run_job(job, work, env, args.timeout)
            if reason is None:
                results[job.name] = result
        if reason:
            why_not[job.name] = reason
    machine = f"{cpu_cores()} CPU cores"
    new_rows, kept = measured_rows(results, why_not, machine)
    if not new_rows:
        print(f"no row was measured; {doc} is unchanged", flush=True)
        return 1
    text = rewrite(read_doc(doc), new_rows, machine, str(ck), kept)
    problems = check(text)
    if problems:
        print(f"error: the rewritten table would be broken; {doc} is unchanged:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(doc)
    print(f"rewrote the headline of {doc}: {len(new_rows)} rows measured, {len(kept)} kept", flush=True)
    return 0


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="deebert-checkpoint", help="a trained checkpoint (make demo writes this one)")
    ap.add_argument("--work", default="/tmp/deebert-bench", help="the checkpoint copy, the JSON and the logs")
    ap.add_argument("--doc", default=str(DOC), help="the BENCHMARKS.md to rewrite or check")
    ap.add_argument("--data", default=str(MOVIE), help="folder with test.jsonl, for bench_gpu.py")
    ap.add_argument("--only", default=None, help="comma-separated jobs to run (the other rows keep their figures)")
    ap.add_argument("--skip", default=None, help="comma-separated jobs not to run")
    ap.add_argument("--extra", nargs=2, action="append", metavar=("JOB", "ARGS"),
                    help="more arguments for one job's command (repeatable); a later flag wins")
    ap.add_argument("--guarantee-movie", nargs=2, metavar=("STAGE1", "POOL"), default=None)
    ap.add_argument("--guarantee-sms", nargs=2, metavar=("STAGE1", "POOL"), default=None)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    ap.add_argument("--dry-run", action="store_true", help="print the command behind each row; run nothing")
    ap.add_argument("--check", action="store_true", help="check the headline table of --doc; run nothing")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    """--check, --dry-run, or the run itself, by the flags."""
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.check:
        problems = check(read_doc(args.doc))
        if problems:
            print(f"{args.doc}: the headline table has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
            return 1
        print(f"{args.doc}: headline table OK ({len(ROWS)} rows, each naming its section and command)")
        return 0
    if args.dry_run:
        dry_run(args)
        return 0
    return run_jobs(args)


if __name__ == "__main__":
    sys.exit(main())
