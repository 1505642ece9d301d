"""Run the 20 cases of issue 30 (the stored setting is a contract; outputs follow one rule) against one
checkpoint and one deebert, and print a Markdown table: case, what it does, exit code, the telling
stderr line (or the HTTP answer), and a note (what happened to the files involved).

    python benchmarks/contract_probes.py --checkpoint CKPT [--python PY] [--repo DIR] [--timeout 300]
    python benchmarks/contract_probes.py --tiny            # a tiny random checkpoint built first (seconds)

Each case runs ``PY -m deebert_cli ...`` with ``PYTHONPATH=DIR`` (default: this checkout and the running
interpreter), so the same script gives the before and after columns: run it once with ``--repo`` at old
main and once at new main. ``--checkpoint`` is copied into a temporary work folder first and never
modified; every case that changes a checkpoint gets a copy of its own (big files hard-linked from the
work copy, ``deebert.json`` copied). The texts the cases need are taken from the checkpoint's own data
(its ``data.dataset``, read with the deebert under test). Every command is bounded by ``--timeout``.
The telling line is, for a failed command, its last stderr line (the error, or a traceback's exception);
for a command that succeeded, its first ``warning:`` line, else its first stderr line.

Only the standard library is imported here.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Probe:
    def __init__(self, python: str, repo: str, work: Path, base: Path, timeout: float):
        self.python, self.repo, self.work, self.base, self.timeout = python, repo, work, base, timeout
        self.env = {**os.environ, "PYTHONPATH": repo, "DEEBERT_NO_PROGRESS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.rows: list = []
        self._n = 0

    # -- running --------------------------------------------------------------------------------------
    def cmd(self, *args) -> list:
        return [self.python, "-m", "deebert_cli", *map(str, args)]

    def run(self, *args, stdin=None, stdout=subprocess.PIPE, timeout=None) -> tuple:
        """(exit code, stdout, stderr, seconds); exit 'timeout' when it ran past the limit."""
        t0 = time.perf_counter()
        try:
            p = subprocess.run(self.cmd(*args), stdin=stdin or subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                               env=self.env, cwd=self.work, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as e:
            return "timeout", "", (e.stderr or b"").decode("utf-8", "replace"), time.perf_counter() - t0
        out = p.stdout.decode("utf-8", "replace") if isinstance(p.stdout, bytes) else ""
        return p.returncode, out, p.stderr.decode("utf-8", "replace"), time.perf_counter() - t0

    def copy(self, meta_edit=None) -> Path:
        """A checkpoint of this case's own; ``meta_edit(meta)`` changes its deebert.json (in place)."""
        self._n += 1
        dst = self.work / f"ckpt-{self._n:02d}"

        def link_big(src, d):
            if os.path.getsize(src) > 1 << 20:
                try:
                    return os.link(src, d)
                except OSError:
                    pass
            return shutil.copy2(src, d)

        shutil.copytree(self.base, dst, copy_function=link_big)
        if meta_edit is not None:
            meta = json.loads((dst / "deebert.json").read_text())
            meta_edit(meta)
            (dst / "deebert.json").write_text(json.dumps(meta, indent=2))  # NaN is written as NaN, as a user might
        return dst

    def row(self, case: str, what: str, result: tuple, note: str = "") -> None:
        code, _, err, _ = result
        self.rows.append((case, what, str(code), telling(err, code), note))
        print(f"  case {case}: exit {code}", file=sys.stderr, flush=True)

    # -- the cases' shared inputs ---------------------------------------------------------------------
    def data(self) -> None:
        """texts.txt (20), many.txt (up to 1000), d.jsonl (200 labelled), d40.jsonl (40), from the checkpoint's data."""
        code = r"""
import json, sys
from deebert_cli.core.data.readers import load_splits
meta = json.load(open(sys.argv[1] + "/deebert.json"))
d = meta.get("data", {})
splits = load_splits(d.get("dataset"))
tc, lc = d.get("text_column", "text"), d.get("label_column", "label")
order = [s for s in ("validation", "test", "train") if s in splits] + [s for s in splits if s not in ("validation", "test", "train")]
rows = []
for s in order:
    t = splits[s]
    names = t.get("__names__" + lc)
    for x, y in zip(t[tc], t[lc]):
        rows.append({tc: x, lc: names[int(y)] if names else y})
json.dump({"rows": rows[:2000], "text": tc, "label": lc}, open(sys.argv[2], "w"))
"""
        out = self.work / "rows.json"
        subprocess.run([self.python, "-c", code, str(self.base), str(out)], env=self.env, check=True, timeout=self.timeout)
        got = json.loads(out.read_text())
        rows, self.text_col, self.label_col = got["rows"], got["text"], got["label"]
        texts = [str(r[self.text_col]).replace("\n", " ").replace("\r", " ") for r in rows]
        (self.work / "texts.txt").write_text("".join(t + "\n" for t in texts[:20]))
        (self.work / "many.txt").write_text("".join(t + "\n" for t in texts[:1000]))
        (self.work / "three.txt").write_text("".join(t + "\n" for t in texts[:3]))
        jl = lambda rs: "".join(json.dumps({self.text_col: r[self.text_col], self.label_col: r[self.label_col]}) + "\n" for r in rs)
        (self.work / "d.jsonl").write_text(jl(rows[:200]))
        (self.work / "d40.jsonl").write_text(jl(rows[:40]))
        self.n_texts = len(texts)
        self.texts = texts


def telling(err: str, code) -> str:
    lines = [l.strip() for l in err.splitlines() if l.strip()]
    if not lines:
        return ""
    if code != 0:
        return lines[-1]
    warn = [l for l in lines if l.startswith("warning:")]
    return (warn or lines)[0]


def guarantee(value: float, layers: int, policy: str = "entropy", **changes) -> dict:
    """A certified guarantee as calibrate stores it (figures made up, plausible)."""
    g = {"risk": "accuracy_drop", "epsilon": 0.005, "delta": 0.05, "n": 452, "policy": policy, "value": value,
         "losses": 1, "empirical": 0.0022, "bound": 0.0049, "mean_exit_layer": layers / 2, "layer_saving": 0.4,
         "tested": 3, "family": 1, "min_n": 300, "entropy": "normalized", "tolerance": None, "accuracy_drop": 0.0,
         "calibrated_on": "probe texts", "by": "calibrate"}
    g.update(changes)
    return g


def with_guarantee(meta: dict, **changes) -> None:
    L = meta["num_layers"]
    value = changes.pop("value", 0.3)
    meta["guarantee"] = guarantee(value, L, **changes)
    if meta["guarantee"]["policy"] == "entropy":
        meta["thresholds"] = {"entropy": "normalized", "values": [value] * (L - 1), "search": "guaranteed",
                              "chosen_on": "probe texts", "by": "calibrate"}


def thresholds(meta: dict, **changes) -> None:
    t = dict(meta.get("thresholds") or {"entropy": "normalized", "values": [0.3] * (meta["num_layers"] - 1)})
    for k, v in changes.items():
        if v is _DROP:
            t.pop(k, None)
        else:
            t[k] = v
    meta["thresholds"] = t


_DROP = object()


def exit_layers(stdout: str) -> str:
    layers = sorted({int(m) for m in re.findall(r"exit (\d+)/\d+", stdout)})
    return f"exit layers {layers}" if layers else ""


def meta_of(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "deebert.json").read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------------
def case_1(p: Probe) -> None:
    ck = p.copy()
    for name, args, flag_file in (
            ("1a", ("calibrate", "--checkpoint", ck, "--unlabeled", "t1.txt", "--check", "--json", "t1.txt"), "t1.txt"),
            ("1b", ("calibrate", "--checkpoint", ck, "--dataset", "d1.jsonl", "--check", "--json", "d1.jsonl"), "d1.jsonl"),
            ("1c", ("analyze", "--checkpoint", ck, "--dataset", "d1.jsonl", "--json", "d1.jsonl", "--examples", "0"), "d1.jsonl")):
        src = "texts.txt" if flag_file.endswith(".txt") else "d.jsonl"
        shutil.copy(p.work / src, p.work / flag_file)
        before = (p.work / flag_file).read_bytes()
        r = p.run(*args)
        same = (p.work / flag_file).read_bytes() == before
        p.row(name, " ".join(map(str, args[:1] + args[3:])).replace(str(ck), "CKPT"), r,
              "input intact" if same else "**input replaced**")


def case_2(p: Probe) -> None:
    ck = p.copy(lambda m: with_guarantee(m, value=0.3))
    r = p.run("analyze", "--checkpoint", ck, "--dataset", "d40.jsonl", "--store-thresholds", "--examples", "0")
    m = meta_of(ck)
    g = m.get("guarantee")
    kept = "guarantee kept" if g and g.get("value") == 0.3 else "**guarantee deleted or replaced**"
    p.row("2", "analyze --store-thresholds on 40 texts, checkpoint certified on 452", r,
          f"{kept}; thresholds now {(m.get('thresholds') or {}).get('values')}; stdout says holds: {'holds' in r[1]}")


def predict_case(p: Probe, case: str, what: str, edit, *extra) -> None:
    ck = p.copy(edit)
    with open(p.work / "texts.txt", "rb") as src:
        r = p.run("predict", "--checkpoint", ck, *extra, stdin=src)
    p.row(case, what, r, exit_layers(r[1]))


def case_3(p: Probe) -> None:
    for sub, v in (("a", float("nan")), ("b", -1.0), ("c", 5.0)):
        predict_case(p, f"3{sub}", f"predict, thresholds.values all {v}",
                     lambda m, v=v: thresholds(m, values=[v] * (m["num_layers"] - 1)))


def case_4(p: Probe) -> None:
    for sub, what, changes, extra in (
            ("a", "guarantee n: -5", {"n": -5}, ()), ("b", "guarantee delta: 7", {"delta": 7}, ()),
            ("c", "guarantee risk: 'bogus'", {"risk": "bogus"}, ()),
            ("d", "patience guarantee value: -2", {"policy": "patience", "value": -2}, ("--exit-policy", "patience")),
            ("e", "patience guarantee value: 2.7", {"policy": "patience", "value": 2.7}, ("--exit-policy", "patience")),
            ("f", "guarantee epsilon: NaN", {"epsilon": float("nan")}, ())):
        predict_case(p, f"4{sub}", f"predict, {what}", lambda m, c=changes: with_guarantee(m, **c), *extra)


def case_5(p: Probe) -> None:
    def edit(m):
        with_guarantee(m, value=0.3)
        m["thresholds"]["entropy"] = "raw"
    predict_case(p, "5", "predict, thresholds.entropy 'raw' beside a normalized guarantee", edit)


def case_6(p: Probe) -> None:
    mixed = p.work / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({p.text_col: t if i % 2 else i}) + "\n" for i, t in enumerate(p.texts[:1000])))
    noisy = p.work / "bytes.txt"
    noisy.write_bytes((p.work / "many.txt").read_bytes() + random.Random(0).randbytes(4000) + b"\n")
    for sub, src in (("a", mixed), ("b", noisy)):
        ck = p.copy()
        before = (ck / "deebert.json").read_bytes()
        r = p.run("calibrate", "--checkpoint", ck, "--unlabeled", src.name)
        changed = (ck / "deebert.json").read_bytes() != before
        p.row(f"6{sub}", f"calibrate --unlabeled {src.name} ({'half the texts integers' if sub == 'a' else 'random bytes appended'})",
              r, "**deebert.json changed**" if changed else "checkpoint unchanged")


def case_7(p: Probe) -> None:
    ck = p.copy(lambda m: with_guarantee(m, value=0.3))
    r = p.run("calibrate", "--checkpoint", ck, "--unlabeled", "many.txt", "--exit-policy", "patience")
    g = meta_of(ck).get("guarantee") or {}
    p.row("7a", "calibrate --exit-policy patience on an entropy guarantee", r,
          f"stored guarantee now: {g.get('policy')} {g.get('value')}")
    with open(p.work / "texts.txt", "rb") as src:
        r = p.run("predict", "--checkpoint", ck, stdin=src)
    p.row("7b", "then plain predict", r, exit_layers(r[1]))


def case_8(p: Probe) -> None:
    for sub, extra in (("a", ("--max-drop", 1, "--max-disagreement", 0.02)), ("b", ("--max-disagreement", 0.02, "--no-guarantee"))):
        ck = p.copy()
        r = p.run("train-exits", "--checkpoint", ck, "--epochs", 1, *extra)
        g = meta_of(ck).get("guarantee") or {}
        p.row(f"8{sub}", "train-exits --epochs 1 " + " ".join(map(str, extra)), r,
              f"guarantee: {g.get('risk')} eps {g.get('epsilon')} value {g.get('value')}" if g else "no guarantee stored")


def case_9(p: Probe) -> None:
    ck = p.copy()
    (p.work / "r9.json").unlink(missing_ok=True)
    r = p.run("calibrate", "--checkpoint", ck, "--unlabeled", "three.txt", "--json", "r9.json")
    p.row("9", "calibrate --unlabeled (3 texts): nothing certifiable", r,
          "--json written" if (p.work / "r9.json").exists() else "no --json")


def case_10(p: Probe) -> None:
    cases = (("a", "guarantee epsilon: '0.02'", lambda m: with_guarantee(m, epsilon="0.02")),
             ("b", "guarantee value: [1.0]", lambda m: with_guarantee(m, value=[1.0])),
             ("c", "thresholds.values: ['a']", lambda m: thresholds(m, values=["a"] * (m["num_layers"] - 1))),
             ("d", "thresholds.values: null", lambda m: thresholds(m, values=None)),
             ("e", "thresholds without values", lambda m: thresholds(m, values=_DROP)),
             ("f", "thresholds.entropy: 'bogus'", lambda m: thresholds(m, entropy="bogus")))
    for sub, what, edit in cases:
        predict_case(p, f"10{sub}", f"predict, {what}", edit)
    bad = lambda m: thresholds(m, values=["a"] * (m["num_layers"] - 1))
    ck = p.copy(bad)
    p.row("10g", "analyze, thresholds.values ['a']", p.run("analyze", "--checkpoint", ck, "--dataset", "d40.jsonl", "--examples", "0"))
    p.row("10h", "calibrate --check, thresholds.values ['a']", p.run("calibrate", "--checkpoint", ck, "--unlabeled", "texts.txt", "--check"))
    p.rows.append(("10i", "serve start-up, thresholds.values ['a']", *serve_start(p, ck)))


def serve_start(p: Probe, ck: Path) -> tuple:
    """(exit, telling line, note) of a serve start-up: it should refuse; a server that starts is stopped."""
    proc = subprocess.Popen(p.cmd("serve", "--checkpoint", ck, "--port", 0, "--no-access-log"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=p.env, cwd=p.work, text=True)
    lines, deadline = [], time.time() + p.timeout
    for line in proc.stderr:
        lines.append(line)
        if "listening on" in line or time.time() > deadline:
            proc.send_signal(signal.SIGTERM)
            break
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    rest = proc.stderr.read()
    err = "".join(lines) + (rest or "")
    started = any("listening on" in l for l in lines)
    return str(proc.returncode), telling(err, 1 if not started else 0), "**started serving**" if started else ""


def case_11(p: Probe) -> None:
    (p.work / "empty.jsonl").write_text("")
    shutil.rmtree(p.work / "out11", ignore_errors=True)
    r = p.run("predict-dataset", "--checkpoint", p.base, "--input", "empty.jsonl", "--output", "out11", "--local-cpus", 2)
    wrote = next((l.strip() for l in r[2].splitlines() if l.startswith("wrote ")), "")
    p.row("11", "predict-dataset --input empty.jsonl (0 rows)", r, wrote)


def case_12(p: Probe) -> None:
    with open(p.work / "texts.txt", "rb") as src, open("/dev/full", "wb") as full:
        r = p.run("predict", "--checkpoint", p.base, stdin=src, stdout=full)
    p.row("12", "predict < in.txt > /dev/full", r, "traceback" if "Traceback" in r[2] else "")


def case_13(p: Probe) -> None:
    (p.work / "out13").mkdir(exist_ok=True)
    r = p.run("analyze", "--checkpoint", p.base, "--plot", "out13/x.jsonl", "--examples", "0")
    p.row("13", "analyze --plot out/x.jsonl", r, f"{r[3]:.1f} s")


def case_14_17(p: Probe) -> None:
    proc = subprocess.Popen(p.cmd("serve", "--checkpoint", p.base, "--port", 0, "--no-access-log"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=p.env, cwd=p.work, text=True)
    try:
        m, deadline = None, time.time() + p.timeout
        for line in proc.stderr:
            m = re.search(r"listening on http://([^ ]+):(\d+)", line)
            if m or time.time() > deadline:
                break
        if not m:
            p.rows.append(("14", "serve --port 0: connect as soon as announced", "no start", "", ""))
            p.rows.append(("17", "POST /predict, Content-Encoding: gzip", "no start", "", ""))
            return
        host, port = m.group(1).strip("[]"), int(m.group(2))
        refused = 0
        for _ in range(50):
            try:
                socket.create_connection((host, port), timeout=5).close()
            except ConnectionRefusedError:
                refused += 1
        p.rows.append(("14", "serve --port 0: 50 connects as soon as 'listening on' is printed", "-",
                       m.group(0), f"refused {refused}/50"))
        for _ in range(100):  # the gzip probe needs the server up, whatever case 14 showed
            try:
                socket.create_connection((host, port), timeout=5).close()
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        req = urllib.request.Request(f"http://{host}:{port}/predict", data=gzip.compress(json.dumps({"inputs": p.texts[0]}).encode()),
                                     headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        p.rows.append(("17", "POST /predict, Content-Encoding: gzip", "-", f"HTTP {status} {body.decode('utf-8', 'replace')[:200]}", ""))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def case_15(p: Probe) -> None:
    ck = p.copy()
    r = p.run("export", "--checkpoint", ck)
    if r[0] != 0:
        p.row("15", "export (needed for case 15)", r, "export failed: case 15 not run")
        return
    for meta in (ck / "deebert.json", ck / "onnx" / "deebert.json"):
        if meta.exists():
            raw = meta.read_bytes()
            meta.write_bytes(raw[: len(raw) // 2])
    with open(p.work / "texts.txt", "rb") as src:
        p.row("15a", "predict --runtime onnx, deebert.json truncated", p.run("predict", "--checkpoint", ck, "--runtime", "onnx", stdin=src))
    p.row("15b", "then `deebert export` (the advice)", p.run("export", "--checkpoint", ck))


def case_16(p: Probe) -> None:
    rows = [json.loads(l) for l in (p.work / "d40.jsonl").read_text().splitlines()[:5]]
    rows[0][p.label_col] = "no-such-label"
    (p.work / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (p.work / "nocol.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in p.texts[:5]))
    p.row("16a", "calibrate --dataset bad.jsonl (unknown label)", p.run("calibrate", "--checkpoint", p.base, "--dataset", "bad.jsonl", "--check"))
    p.row("16b", "calibrate --unlabeled nocol.jsonl (no text column)", p.run("calibrate", "--checkpoint", p.base, "--unlabeled", "nocol.jsonl", "--check"))


def case_18(p: Probe) -> None:
    ck = p.copy()
    proc = subprocess.Popen(p.cmd("export", "--checkpoint", ck), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=p.env, cwd=p.work)
    deadline = time.time() + p.timeout
    while time.time() < deadline and proc.poll() is None and not any(".onnx.tmp" in e.name for e in ck.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    left = [e.name for e in ck.iterdir() if ".onnx.tmp" in e.name]
    r = p.run("export", "--checkpoint", ck)
    after = [e.name for e in ck.iterdir() if ".onnx.tmp" in e.name]
    p.row("18", "kill -9 during export, then export again", r, f"temporary folders: {len(left)} after the kill, {len(after)} after the next export")


def case_19(p: Probe) -> None:
    r = p.run("analyze", "--checkpoint", p.base, "--examples", "0")
    line = next((l for l in r[1].splitlines() if l.startswith("recommended threshold")), "")
    m = re.search(r"fewer layers, (.*)$", line)
    p.row("19", "analyze: the measured time saving (load-dependent)", r, (m.group(1) if m else line)[:160])


def case_20(p: Probe) -> None:
    texts = p.texts[:200]
    cr = [t if i % 3 else t[: len(t) // 2] + "\r" + t[len(t) // 2:] for i, t in enumerate(texts)]
    (p.work / "cr.txt").write_bytes("".join(t + "\n" for t in cr).encode())
    (p.work / "r20.json").unlink(missing_ok=True)
    r = p.run("calibrate", "--checkpoint", p.base, "--unlabeled", "cr.txt", "--check", "--json", "r20.json")
    n = None
    try:
        n = json.loads((p.work / "r20.json").read_text()).get("n")
    except (OSError, ValueError):
        pass
    with open(p.work / "cr.txt", "rb") as src:
        pr = p.run("predict", "--checkpoint", p.base, stdin=src)
    p.row("20", f"calibrate --unlabeled cr.txt ({len(texts)} lines, {len(texts[::3])} with a lone \\r)", r,
          f"calibrated on n={n}; predict read {len(pr[1].splitlines())} lines")


CASES = {1: case_1, 2: case_2, 3: case_3, 4: case_4, 5: case_5, 6: case_6, 7: case_7, 8: case_8, 9: case_9,
         10: case_10, 11: case_11, 12: case_12, 13: case_13, 14: case_14_17, 15: case_15, 16: case_16,
         18: case_18, 19: case_19, 20: case_20}


def markdown(rows: list) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    out = ["| case | what | exit | stderr (or HTTP answer) | note |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def tiny_checkpoint(python: str, repo: str, work: Path, timeout: float) -> Path:
    code = ("import sys, pathlib; sys.path.insert(0, sys.argv[1] + '/tests'); import conftest; "
            "print(conftest.train_tiny_checkpoint(pathlib.Path(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": repo, "DEEBERT_NO_PROGRESS": "1"}
    got = subprocess.run([python, "-c", code, repo, str(work)], env=env, capture_output=True, text=True, timeout=timeout * 4, check=True)
    return Path(got.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="the trained checkpoint to probe (copied first, never modified)")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random checkpoint with the repo's tests/conftest.py instead")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs `-m deebert_cli` (default: this one)")
    ap.add_argument("--repo", default=str(ROOT), help="the deebert checkout put on PYTHONPATH (default: this one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one command may run (default 300)")
    ap.add_argument("--only", help="comma-separated case numbers (default: all)")
    ap.add_argument("--work", help="work folder (default: a new temporary one, removed at the end)")
    args = ap.parse_args(argv)
    if not args.tiny and not args.checkpoint:
        ap.error("give --checkpoint DIR or --tiny")
    if args.checkpoint and not (Path(args.checkpoint) / "deebert.json").is_file():
        ap.error(f"--checkpoint '{args.checkpoint}' has no deebert.json")
    work = Path(args.work or tempfile.mkdtemp(prefix="contract-probes-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = tiny_checkpoint(args.python, str(Path(args.repo).resolve()), work / "tiny", args.timeout) if args.tiny else Path(args.checkpoint)
        base = work / "base"
        shutil.copytree(src, base)
        p = Probe(args.python, str(Path(args.repo).resolve()), work, base, args.timeout)
        p.data()
        only = {int(x) for x in args.only.split(",")} if args.only else None
        for n, fn in CASES.items():
            if only is None or n in only or (n == 14 and 17 in only):
                print(f"case {n} ...", file=sys.stderr, flush=True)
                try:
                    fn(p)
                except Exception as e:  # a probe that could not run is a row, not the end of the table
                    p.rows.append((str(n), fn.__name__, "probe failed", f"{type(e).__name__}: {e}", ""))
        print(f"\ndeebert at {args.repo} ({args.python}); checkpoint {args.checkpoint or 'tiny'}\n")
        print(markdown(p.rows))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
