"""`rkit serve` under load, with a writer updating the index and a kill -9 mid-load.

    python -m benchmarks.serve_load [--chunks 100000] [--seconds 60] [--clients 16] [--out benchmarks/results/serve]
    python -m benchmarks.serve_load --quick          # 5,000 chunks, 10 s phases: a few minutes
    python -m benchmarks.serve_load --factory HNSW32 # the same vectors in an HNSW index (copied, not re-embedded)

What it does, every phase against a real `rkit serve` subprocess on loopback, clients in this process
(asyncio + httpx, one connection each, closed loop: a client sends its next query when its last is answered):
1. Builds (once, cached under $RKIT_HOME/bench/serve/) a corpus of one-chunk documents from the shared data's
   texts — the training-pool queries, CACM and AdvBench-IR documents (41k distinct texts) — repeated in
   shards under new ids until ``--chunks`` is reached, and indexes it with `rkit index` (FAISS Flat).
2. Load per query mode: ``--clients`` clients for ``--seconds`` each (teacher, hybrid = the default recipe
   with the generative signal, hybrid-lexical = bm25+teacher; teacher and hybrid also at 1 and 4 clients):
   QPS, p50/p90/p99, errors. Queries are held-out training-pool records (mixed.jsonl from line 20,000, never
   an evaluation set): the first 1,000 of ≤ 16 words (search-box queries), and the pool as it comes.
3. Batching: the teacher and hybrid loads again against a server started with ``--max-batch 1``.
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
import shutil
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
SEEN_WAIT_S = 30  # how long after a writer exits its update may take to become searchable before it counts as lost
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


def build(chunks: int, home: Path, factory: str = "Flat") -> tuple[Path, Path]:
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
    flat = index_dir / f"load-{chunks}"
    name = flat.name if factory == "Flat" else f"{flat.name}-{factory.lower().replace(',', '-')}"
    started = time.perf_counter()
    if name != flat.name and not (index_dir / name).exists() and flat.exists():
        shutil.copytree(flat, index_dir / name)  # same vectors, another factory: no re-embedding
    subprocess.run([str(RKIT), "index", str(corpus), "--name", name, "--index-dir", str(index_dir), "--json",
                    "--factory", factory], check=True, stdout=subprocess.DEVNULL)
    print(f"index {name} ready ({time.perf_counter() - started:.0f} s)", flush=True)
    return corpus, index_dir / name


def _planted(version: int, new: bool = False) -> str:
    token = f"NEW{version}" if new else f"OLD{version}"
    docs = [{"_id": "planted", "title": "Planted", "text": f"the planted marker is zqxv{token} for this run"}]
    if new:
        docs.append({"_id": f"added{version}", "title": "Added", "text": f"a document added in update {version} zqxvadd{version}"})
    return "".join(json.dumps(d) + "\n" for d in docs)


def query_sets() -> dict[str, list[str]]:
    mixed = [json.loads(line)["text"] for line in open(DATA / "train_queries" / "mixed.jsonl", encoding="utf-8")]
    held_out = mixed[20_000:]  # never used to train the shipped adapter or tune the hybrid recipe
    return {"short": [q for q in held_out if len(q.split()) <= 16][:1000],  # search-box queries
            "pool": [q for q in held_out[:1000] if len(q) <= 1000]}  # the pool as it comes (prompts, problems)


# -- server -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``env``: variables set for the server process on top of this one's (serve_compare runs an earlier
    commit's code through PYTHONPATH)."""

    def __init__(self, folder: Path, max_batch: int = 32, env: dict | None = None):
        self.folder, self.max_batch, self.port, self.proc = folder, max_batch, _free_port(), None
        self.env = {**os.environ, **env} if env else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait until /health says ready; the seconds that took."""
        started = time.perf_counter()
        self.proc = subprocess.Popen([str(RKIT), "serve", "--index", str(self.folder), "--port", str(self.port),
                                      "--max-batch", str(self.max_batch)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env)
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
            if not ok:
                await asyncio.sleep(0.05)  # a server that is down is retried, not spun on


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) the process ``pid`` has used so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def load(url: str, queries: list[str], body: dict, clients: int, seconds: float, during=None,
         pid: int | None = None) -> dict:
    """``clients`` closed-loop clients for ``seconds``; ``during``: a coroutine run alongside (writer, kill).
    ``pid``: the server's, to split the CPU time a request costs between it and these clients (both share the
    machine's cores, so the clients' share is time the server could not use)."""

    async def run():
        out: list = []
        deadline = time.perf_counter() + seconds
        tasks = [_client(url, queries, body, deadline, c * 131, out) for c in range(clients)]
        extra = [during(deadline)] if during else []
        results = await asyncio.gather(*tasks, *extra)
        return out, (results[-1] if during else None)

    started, server_cpu, client_cpu = time.perf_counter(), _cpu_s(pid), time.process_time()
    out, extra = asyncio.run(run())
    wall = time.perf_counter() - started
    summary = summarise(out, wall)
    server_after = _cpu_s(pid)
    if summary["ok"] and server_cpu is not None and server_after is not None:
        summary["server_cpu_ms_per_request"] = round(1000 * (server_after - server_cpu) / summary["ok"], 2)
        summary["client_cpu_ms_per_request"] = round(1000 * (time.process_time() - client_cpu) / summary["ok"], 2)
    return {**summary, "extra": extra, "_raw": out}


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
    events = {"updates": [], "wrong": [], "checks": 0}

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
                writing = asyncio.ensure_future(proc.communicate())
                wrote = seen_new = None
                # check all the time the writer runs and after: never both texts, never NEW before the update's
                # generation nor OLD after it. Past the load's deadline too, until the writer has exited and NEW
                # shows (at most SEEN_WAIT_S after the exit): an update must become searchable, not just not break
                while seen_new is None:
                    now = time.perf_counter()
                    if wrote is None and writing.done():
                        wrote = now
                    if now >= deadline and wrote is not None and now >= wrote + SEEN_WAIT_S:
                        break
                    for token, is_new in ((f"zqxvNEW{version}", True), (f"zqxvOLD{version}", False)):
                        r = (await http.post("/search", json={"query": token, "k": 3, "query_mode": "bm25"})).json()
                        events["checks"] += 1
                        found = any(h["doc_id"] == "planted" and token in h["snippet"] for h in r["hits"])
                        newer = r["generation"] > before
                        if found and newer != is_new:  # OLD after the update, or NEW before it
                            events["wrong"].append({"token": token, "generation": r["generation"], "before": before})
                        if found and is_new and wrote is not None:
                            seen_new = time.perf_counter() - wrote
                        elif found and is_new:
                            seen_new = 0.0  # live before the writer process had even exited
                    await asyncio.sleep(0.05)
                stdout, stderr = await writing
                wrote = wrote or time.perf_counter()
                if proc.returncode:
                    events["updates"].append({"error": stderr.decode()[-300:]})
                    break
                report = json.loads(stdout)
                events["updates"].append({"version": version, "index_s": round(wrote - started, 1),
                                          "re_embedded": report.get("chunks_embedded"),
                                          "searchable_after_s": None if seen_new is None else round(seen_new, 2)})
                await asyncio.sleep(1)
                (corpus / "planted.jsonl").write_text(_planted(version + 1))  # next round starts from OLD
                if version >= 3:
                    break
        return events

    result = load(server.url, queries, MODES["teacher"], clients, seconds, during=checker, pid=server.proc.pid)
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
    ap.add_argument("--factory", default="Flat", help="FAISS index_factory of the served index (Flat, HNSW32 …)")
    ap.add_argument("--quick", action="store_true", help="5,000 chunks, 10 s phases")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.seconds = 5000, 10
    home = rkit_home() / "bench" / "serve"
    corpus, folder = build(args.chunks, home, args.factory)
    sets = query_sets()
    c, t = args.clients, args.seconds
    # (label, request fields, query set, clients, seconds)
    phases = [("teacher · 1 client", MODES["teacher"], "short", 1, t / 3),
              ("teacher · 4 clients", MODES["teacher"], "short", 4, t / 3),
              (f"teacher · {c} clients", MODES["teacher"], "short", c, t),
              (f"hybrid-lexical · {c} clients", MODES["hybrid-lexical"], "short", c, t),
              ("hybrid · 1 client", MODES["hybrid"], "short", 1, t / 3),
              (f"hybrid · {c} clients", MODES["hybrid"], "short", c, t),
              (f"teacher · {c} clients · pool queries", MODES["teacher"], "pool", c, t)]
    command = "python -m benchmarks.serve_load" + " ".join([""] + sys.argv[1:])
    results: dict = {"machine": machine_info(), "command": command, "chunks": args.chunks, "factory": args.factory, "clients": c,
                     "seconds": t, "distinct_texts": int((corpus / "DONE").read_text()),
                     "query_words": {k: round(statistics.fmean(len(q.split()) for q in v), 1) for k, v in sets.items()},
                     "phases": {}}
    server = Server(folder)
    try:
        results["start_to_ready_s"] = round(server.start(), 1)
        load(server.url, sets["short"], MODES["teacher"], 4, 3)  # warm-up
        for label, body, which, clients, seconds in phases:
            print(f"load: {label} …", flush=True)
            results["phases"][label] = _public(load(server.url, sets[which], body, clients, seconds,
                                                         pid=server.proc.pid))
            print(f"  {results['phases'][label]}", flush=True)
        print("writer under load …", flush=True)
        results["writer"] = _public(writer_phase(server, corpus, folder, sets["short"], c, t))
        print(f"  {results['writer']}", flush=True)
        print("kill -9 under load …", flush=True)
        results["kill"] = kill_phase(server, folder, sets["short"], c, max(10.0, t / 3))
        print(f"  {results['kill']}", flush=True)
    finally:
        server.stop()
    unbatched = Server(folder, max_batch=1)
    try:
        unbatched.start()
        load(unbatched.url, sets["short"], MODES["teacher"], 4, 3)
        for mode in ("teacher", "hybrid"):
            label = f"{mode} · {c} clients · --max-batch 1"
            print(f"load: {label} …", flush=True)
            results["phases"][label] = _public(load(unbatched.url, sets["short"], MODES[mode], c, t,
                                                              pid=unbatched.proc.pid))
    finally:
        unbatched.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("load-quick" if args.quick else "load") + ("" if args.factory == "Flat" else f"-{args.factory.lower()}")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report(results))
    plot(results, args.out / f"{stem}.png")
    print(report(results))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(r["phases"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    for i, label in enumerate(labels):
        s = r["phases"][label]
        ax.plot([s["p50_ms"], s["p99_ms"]], [i, i], color="0.6")
        ax.plot(s["p50_ms"], i, "o", color="tab:blue", label="p50" if i == 0 else None)
        ax.plot(s["p99_ms"], i, "|", color="tab:red", markersize=12, label="p99" if i == 0 else None)
        ax.text(s["p99_ms"] * 1.08, i, f"{s['qps']} QPS", va="center", fontsize=8)
    ax.axvline(30, ls="--", color="tab:green", lw=1, label="target p50 30 ms")
    ax.set_xscale("log")
    ax.set_xlim(right=3 * max(s["p99_ms"] for s in r["phases"].values()))  # room for the QPS labels
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency per search (ms, log)")
    ax.set_title(f"rkit serve, {r['chunks']:,} chunks ({r['factory']}), {r['machine'].get('cpu_count')} cores", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def report(r: dict) -> str:
    m = r["machine"]
    words = ", ".join(f"{k} {v}" for k, v in r["query_words"].items())
    lines = [f"# rkit serve under load: {r['chunks']:,} chunks (FAISS {r['factory']})", "",
             f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, torch {m.get('torch')} ({m.get('threads')} threads); "
             f"the clients run on the same machine. Corpus: {r['distinct_texts']:,} distinct texts (training-pool "
             f"queries, CACM and AdvBench-IR documents) repeated in shards. Queries: held-out training-pool records "
             f"(mean words: {words}). Server start to ready: {r['start_to_ready_s']} s. "
             # results written before the command was recorded: rebuilt from what they hold
             f"Command: `{r.get('command') or 'python -m benchmarks.serve_load' + ('' if r['factory'] == 'Flat' else ' --factory ' + r['factory'])}`.",
             "", "CPU ms per request: CPU time the server process (and the clients, in this process) used over the phase, "
             "divided by the requests answered; the two share the cores, so the sum bounds QPS at about "
             "cores × 1000 / (server + clients).", "",
             "| load | requests | errors | QPS | p50 ms | p90 ms | p99 ms | server CPU ms/req | clients CPU ms/req |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in r["phases"].items():
        lines.append(f"| {label} | {s['requests']} | {s['errors']} | {s['qps']} | {s['p50_ms']} | {s['p90_ms']} | "
                     f"{s['p99_ms']} | {s.get('server_cpu_ms_per_request', '–')} | {s.get('client_cpu_ms_per_request', '–')} |")
    w = r.get("writer") or {}
    if w:
        ev = w.get("extra") or {}
        lines += ["", f"Writer under load (teacher, {r['clients']} clients): {w['requests']} requests, {w['errors']} errors "
                  f"(p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms); {len(ev.get('wrong', []))} wrong hits in "
                  f"{ev.get('checks')} checks; updates: "
                  + "; ".join(f"v{u.get('version')}: `rkit index` {u.get('index_s')} s ({u.get('re_embedded')} chunks "
                              f"re-embedded), " + (f"searchable {u['searchable_after_s']} s after it exited"
                                                     if u.get("searchable_after_s") is not None
                                                     else f"NOT searchable {SEEN_WAIT_S} s after it exited")
                              for u in ev.get("updates", []))]
    k = r.get("kill") or {}
    if k:
        lines += ["", f"kill -9 under load: the server was killed mid-load ({k['failed_around_kill']} requests failed "
                  f"while it was down, clients retrying every 50 ms); started again, ready in {k['restart_to_ready_s']} s; "
                  f"then {k['after_restart']['requests']} requests, {k['after_restart']['errors']} errors "
                  f"(p50 {k['after_restart']['p50_ms']} ms); index intact (counts and vectors as before the kill): "
                  f"{k['index_intact']}; planted document found: {k['planted_found']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
