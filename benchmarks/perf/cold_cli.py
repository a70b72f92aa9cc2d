"""Stage 1: a cold `rkit search` (a new process each time, as a user types it) against a bare script that loads
the same teacher with sentence-transformers, opens the same FAISS file and searches — and how fast bad input is
reported, against that same bare script.

Every run is a subprocess timed by wall clock; the commands alternate within each repeat so that a noisy moment
on the shared box hits all of them alike.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .common import RKIT, Figure, check, sample_index, stats

QUERY = "how do I rotate the API keys?"
BARE = '''import sys
import faiss
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], device="cpu")
index = faiss.read_index(sys.argv[2])
scores, ids = index.search(model.encode([sys.argv[3]], normalize_embeddings=True), 5)
print(ids[0].tolist())
'''


def _wall(cmd: list[str], expect_ok: bool = True) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if (out.returncode == 0) != expect_ok:
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}")
    return seconds


def run(quick: bool, workdir: Path, log) -> list[Figure]:
    from retrieval_kit.models.teacher import resolve_teacher

    empty = workdir / "empty-folder"
    empty.mkdir(parents=True, exist_ok=True)
    log("cold CLI: the sample index")
    homes = sample_index(workdir).parent
    script = workdir / "bare_search.py"
    script.write_text(BARE)
    bare = [sys.executable, str(script), resolve_teacher("minilm"), str(homes / "cold" / "faiss.index"), QUERY]
    search = [str(RKIT), "search", QUERY, "--index", "cold", "--index-dir", str(homes), "-k", "5", "--query-mode"]
    commands = {
        "bare script": (bare, True),
        "teacher": (search + ["teacher"], True),
        "hybrid": (search + ["hybrid"], True),
        "generative": (search + ["generative"], True),
        "error: missing corpus": ([str(RKIT), "index", str(workdir / "no-such-folder"), "--name", "x",
                                   "--index-dir", str(homes)], False),
        "error: empty folder": ([str(RKIT), "index", str(empty), "--name", "x", "--index-dir", str(homes)], False),
        "error: no such index": ([str(RKIT), "search", QUERY, "--index", "nope", "--index-dir", str(homes)], False),
    }
    repeat = 3 if quick else 5
    times: dict[str, list[float]] = {name: [] for name in commands}
    _wall(bare)  # warm the page cache for both sides
    _wall(search + ["hybrid"])
    for r in range(repeat):
        log(f"cold CLI: round {r + 1}/{repeat}")
        for name, (cmd, ok) in commands.items():
            times[name].append(_wall(cmd, ok))
    peer = stats(times["bare script"])
    figures = []
    for name in commands:
        if name == "bare script":
            continue
        ours = stats(times[name])
        ratio = ours.median / peer.median
        error = name.startswith("error")
        target = "≤ 0.3" if error else ("≤ 1.5" if name in ("teacher", "hybrid") else None)
        met = check(ratio, target) if target else None
        why = ""
        if met is False:
            why = ("the query mode needs the backbone: transformers' model stack and the LLM load on top of the "
                   "teacher" if not error else "the CLI imports more than it needs before checking the input")
        figures.append(Figure("cold CLI", f"rkit {'search --query-mode ' + name if not error else name}",
                              round(ours.median, 3), "s", round(peer.median, 3), "bare sentence-transformers + FAISS script",
                              round(ratio, 3), target, met, why,
                              {"ours": ours.as_dict(), "peer": peer.as_dict(), "ratio": "ours / peer",
                               "index": "the sample corpus (retrieval_kit/data/sample_corpus), FAISS Flat"}))
    return figures
