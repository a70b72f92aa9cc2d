"""`rkit serve` under load, with a writer updating the index and a kill -9 mid-load.

    python -m benchmarks.serve_load [--chunks 100000] [--seconds 60] [--clients 16] [--out benchmarks/results/serve]
    python -m benchmarks.serve_load --quick          # 5,000 chunks, 10 s phases: a few minutes

What it does, every phase against a real `rkit serve` subprocess on loopback, clients in this process
(asyncio + httpx, one connection each, closed loop: a client sends its next query when its last is answered):
1. Builds (once, cached under $RKIT_HOME/bench/serve/) a corpus of one-chunk documents from the shared data's
   texts — the training-pool queries, CACM and AdvBench-IR documents (41k distinct texts) — repeated in
   shards under new ids until ``--chunks`` is reached, and indexes it with `rkit index` (FAISS Flat).
2. Load per query mode: ``--clients`` clients for ``--seconds`` each (teacher, hybrid = the default recipe
   with the generative signal, hybrid-lexical = bm25+teacher): QPS, p50/p90/p99, errors. Queries are held-out
   training-pool records (lines 20,000-20,999 of mixed.jsonl), never an evaluation set.
3. Batching: the teacher-mode load again against a server started with ``--max-batch 1``.
4. A writer under load: while the clients run, `rkit index` re-indexes changed files three times (a planted
   document's text moves from token OLD<i> to NEW<i>, a new document appears). A checker asks for both tokens
   (bm25) every 50 ms: a response from a generation at or after the update that still shows OLD, or one
   before it that shows NEW, is a wrong hit. Errors must be 0 and NEW must become searchable.
5. kill -9 mid-load: the server is killed while the clients run, started again; the time until it serves, the
   errors after it is back (must be 0), and the index checked intact (`rkit info`, the planted document).

Timings are a benchmark, never a test; the machine is recorded. Results: load.json, load.md, load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from retrieval_kit.machine import machine_info
from retrieval_kit.paths import rkit_home

DATA = Path(os.environ.get("RKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RKIT = Path(sys.executable).with_name("rkit")
SHARD_DOCS = 1000
MAX_WORDS = 150  # under the default 200-word chunk: one document is one chunk
MODES = {"teacher": {"query_mode": "teacher"}, "hybrid": {"query_mode": "hybrid"},
         "hybrid-lexical": {"query_mode": "hybrid", "signals": {"bm25": 1, "teacher": 1}}}


# -- corpus and index -------------------------------------------------------------------------------
def _texts() -> list[str]:
    seen: dict[str, None] = {}
    for path in sorted(glob.glob(str(DATA / "train_queries" / "*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            seen.setdefault(json.loads(line)["text"].strip(), None)
    for path in (DATA / "cacm" / "corpus.jsonl", DATA / "advbench_ir" / "corpus.jsonl",
                 DATA / "advbench_ir" / "documents.jsonl"):
        for line in open(path, encoding="utf-8"):
            doc = json.loads(line)
            seen.setdefault(" ".join(f"{doc.get('title', '')} {doc.get('text', '')}".split()), None)
    return [" ".join(t.split()[:MAX_WORDS]) for t in seen if t]


def build(chunks: int, home: Path) -> tuple[Path, Path]:
    corpus, index_dir = home / f"corpus-{chunks}", home / "indexes"
    if not (corpus / "DONE").is_file():
        corpus.mkdir(parents=True, exist_ok=True)
        texts, written, shard = _texts(), 0, 0
        while written < chunks:
            n = min(SHARD_DOCS, chunks - written)
            with open(corpus / f"shard-{shard:03d}.jsonl", "w", encoding="utf-8") as out:
                for i in range(written, written + n):
                    out.write(json.dumps({"_id": f"d{i}", "title": "", "text": texts[i % len(texts)]}) + "\n")
            written, shard = written + n, shard + 1
        (corpus / "planted.jsonl").write_text(_planted(0))
        (corpus / "DONE").write_text(str(len(texts)))
    name = f"load-{chunks}"
    started = time.perf_counter()
    subprocess.run([str(RKIT), "index", str(corpus), "--name", name, "--index-dir", str(index_dir), "--json"],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"index {name} ready ({time.perf_counter() - started:.0f} s)", flush=True)
    return corpus, index_dir / name


def _planted(version: int, new: bool = False) -> str:
    token = f"NEW{version}" if new else f"OLD{version}"
    docs = [{"_id": "planted", "title": "Planted", "text": f"the planted marker is zqxv{token} for this run"}]
    if new:
        docs.append({"_id": f"added{version}", "title": "Added", "text": f"a document added in update {version} zqxvadd{version}"})
    return "".join(json.dumps(d) + "\n" for d in docs)


# -- server -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, max_batch: int = 32):
        self.folder, self.max_batch, self.port, self.proc = folder, max_batch, _free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait until /health says ready; the seconds that took."""
        started = time.perf_counter()
        self.proc = subprocess.Popen([str(RKIT), "serve", "--index", str(self.folder), "--port", str(self.port),
                                      "--max-batch", str(self.max_batch)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while time.perf_counter() - started < 300:
            if self.proc.poll() is not None:
                raise SystemExit(f"rkit serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("rkit serve did not become ready in 300 s")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


# -- clients ----------------------------------------------------------------------------------------
async def _client(url: str, queries: list[str], body: dict, deadline: float, offset: int, out: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        i = offset
        while time.perf_counter() < deadline:
            query = queries[i % len(queries)]
            i += 7
            started = time.perf_counter()
            try:
                response = await http.post("/search", json={"query": query, "k": 10, **body})
                ok = response.status_code == 200
                detail = "" if ok else f"{response.status_code} {response.text[:120]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}"
            out.append((started, time.perf_counter() - started, ok, detail))


def load(url: str, queries: list[str], body: dict, clients: int, seconds: float, during=None) -> dict:
    """``clients`` closed-loop clients for ``seconds``; ``during``: a coroutine run alongside (writer, kill)."""

    async def run():
        out: list = []
        deadline = time.perf_counter() + seconds
        tasks = [_client(url, queries, body, deadline, c * 131, out) for c in range(clients)]
        extra = [during(deadline)] if during else []
        results = await asyncio.gather(*tasks, *extra)
        return out, (results[-1] if during else None)

    started = time.perf_counter()
    out, extra = asyncio.run(run())
    wall = time.perf_counter() - started
    return {**summarise(out, wall), "extra": extra, "_raw": out}


def summarise(out: list, wall: float) -> dict:
    lat = sorted(1000 * d for _, d, ok, _ in out if ok)
    errors = [detail for _, _, ok, detail in out if not ok]

    def pct(p: float):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    return {"requests": len(out), "ok": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "qps": round(len(lat) / wall, 1), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat), 1) if lat else None, "seconds": round(wall, 1)}


# -- the writer and the checker ---------------------------------------------------------------------------
def writer_phase(server: Server, corpus: Path, folder: Path, queries, clients, seconds) -> dict:
    events = {"updates": [], "wrong": [], "checks": 0, "first_new_s": []}

    async def checker(deadline: float):
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            version = 0
            loop = asyncio.get_running_loop()
            while time.perf_counter() < deadline:
                version += 1
                (corpus / "planted.jsonl").write_text(_planted(version, new=True))
                before = (await http.get("/indexes")).json()["indexes"][0]["generation"]
                started = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    str(RKIT), "index", str(corpus), "--name", folder.name, "--index-dir", str(folder.parent),
                    "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                stdout, stderr = await proc.communicate()
                if proc.returncode:
                    events["updates"].append({"error": stderr.decode()[-300:]})
                    break
                report = json.loads(stdout)
                wrote = time.perf_counter()
                seen_new = None
                while time.perf_counter() < deadline and seen_new is None:
                    for token, is_new in ((f"zqxvNEW{version}", True), (f"zqxvOLD{version}", False)):
                        r = (await http.post("/search", json={"query": token, "k": 3, "query_mode": "bm25"})).json()
                        events["checks"] += 1
                        found = any(h["doc_id"] == "planted" and token in h["snippet"] for h in r["hits"])
                        newer = r["generation"] > before
                        if found and newer != is_new:  # OLD after the update, or NEW before it
                            events["wrong"].append({"token": token, "generation": r["generation"], "before": before})
                        if found and is_new:
                            seen_new = time.perf_counter() - wrote
                    await asyncio.sleep(0.05)
                events["updates"].append({"version": version, "index_s": round(wrote - started, 1),
                                          "re_embedded": report.get("chunks_embedded"),
                                          "searchable_after_s": None if seen_new is None else round(seen_new, 2)})
                await asyncio.sleep(1)
                (corpus / "planted.jsonl").write_text(_planted(version + 1))  # next round starts from OLD
                if version >= 3:
                    break
        return events

    result = load(server.url, queries, MODES["teacher"], clients, seconds, during=checker)
    # leave the corpus as the build made it, and the index in step with it
    (corpus / "planted.jsonl").write_text(_planted(0))
    subprocess.run([str(RKIT), "index", str(corpus), "--name", folder.name, "--index-dir", str(folder.parent)],
                   check=True, stdout=subprocess.DEVNULL)
    return result


def kill_phase(server: Server, folder: Path, queries, clients, seconds) -> dict:
    info = lambda: json.loads(subprocess.run([str(RKIT), "info", str(folder), "--json"], check=True,  # noqa: E731
                                             capture_output=True, text=True).stdout)
    before = info()

    async def killer(deadline: float):
        await asyncio.sleep(max(1.0, (deadline - time.perf_counter()) / 2))
        server.kill9()
        return time.perf_counter()

    during = load(server.url, queries, MODES["teacher"], clients, seconds, during=killer)
    killed_at = during["extra"]
    restart_s = server.start()
    after_load = load(server.url, queries, MODES["teacher"], clients, seconds)
    after = info()
    probe = httpx.post(server.url + "/search", json={"query": "zqxvOLD0", "k": 1, "query_mode": "bm25"}).json()
    failed_after_kill = sum(1 for s, _, ok, _ in during["_raw"] if not ok and s >= killed_at - 1)
    return {"before_kill": {k: during[k] for k in ("requests", "errors")},
            "failed_around_kill": failed_after_kill, "restart_to_ready_s": round(restart_s, 1),
            "after_restart": {k: v for k, v in after_load.items() if not k.startswith("_") and k != "extra"},
            "index_intact": before["counts"] == after["counts"] and after["vectors"] == after["counts"]["chunks"],
            "planted_found": bool(probe["hits"]) and probe["hits"][0]["doc_id"] == "planted"}


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="5,000 chunks, 10 s phases")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.seconds = 5000, 10
    home = rkit_home() / "bench" / "serve"
    corpus, folder = build(args.chunks, home)
    mixed = [json.loads(line)["text"] for line in open(DATA / "train_queries" / "mixed.jsonl", encoding="utf-8")]
    queries = mixed[20_000:21_000]
    results: dict = {"machine": machine_info(), "chunks": args.chunks, "clients": args.clients,
                     "seconds": args.seconds, "distinct_texts": int((corpus / "DONE").read_text()), "modes": {}}
    server = Server(folder)
    try:
        results["start_to_ready_s"] = round(server.start(), 1)
        load(server.url, queries, MODES["teacher"], 4, 3)  # warm-up
        for mode, body in MODES.items():
            print(f"load: {mode} …", flush=True)
            results["modes"][mode] = _public(load(server.url, queries, body, args.clients, args.seconds))
            print(f"  {results['modes'][mode]}", flush=True)
        print("writer under load …", flush=True)
        results["writer"] = _public(writer_phase(server, corpus, folder, queries, args.clients, args.seconds))
        print(f"  {results['writer']}", flush=True)
        print("kill -9 under load …", flush=True)
        results["kill"] = kill_phase(server, folder, queries, args.clients, max(10.0, args.seconds / 3))
        print(f"  {results['kill']}", flush=True)
    finally:
        server.stop()
    unbatched = Server(folder, max_batch=1)
    try:
        unbatched.start()
        load(unbatched.url, queries, MODES["teacher"], 4, 3)
        print("load: teacher, --max-batch 1 …", flush=True)
        results["modes"]["teacher (max-batch 1)"] = _public(load(unbatched.url, queries, MODES["teacher"],
                                                                 args.clients, args.seconds))
    finally:
        unbatched.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "load-quick" if args.quick else "load"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report(results))
    print(report(results))


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"# rkit serve under load: {r['chunks']:,} chunks, {r['clients']} clients × {r['seconds']:g} s",
             "", f"Machine: {m.get('cpu')} · {m.get('cores')} cores · {m.get('memory_gb')} GB · torch {m.get('torch')}; "
             f"clients run on the same machine. Corpus: {r['distinct_texts']:,} distinct texts repeated in shards. "
             f"Server start to ready: {r['start_to_ready_s']} s.", "",
             "| load | requests | errors | QPS | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|---|"]
    for mode, s in r["modes"].items():
        lines.append(f"| {mode} | {s['requests']} | {s['errors']} | {s['qps']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} |")
    w = r.get("writer") or {}
    if w:
        ev = w.get("extra") or {}
        lines += ["", f"Writer under load (teacher mode): {w['requests']} requests, {w['errors']} errors, "
                  f"{len(ev.get('wrong', []))} wrong hits in {ev.get('checks')} checks; updates: "
                  + "; ".join(f"v{u.get('version')}: indexed in {u.get('index_s')} s, searchable "
                              f"{u.get('searchable_after_s')} s after" for u in ev.get("updates", []))]
    k = r.get("kill") or {}
    if k:
        lines += ["", f"kill -9 under load: {k['failed_around_kill']} requests failed around the kill; ready again "
                  f"{k['restart_to_ready_s']} s after restart; then {k['after_restart']['requests']} requests, "
                  f"{k['after_restart']['errors']} errors; index intact: {k['index_intact']}; "
                  f"planted document found: {k['planted_found']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
