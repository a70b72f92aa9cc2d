"""benchmarks.serve_compare runs an earlier commit's server with the stack that commit's lock installs."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.serve_compare import _side_env


def test_the_earlier_side_hides_what_its_lock_lacks_and_imports_its_own_code(tmp_path):
    ref = tmp_path / "ref"
    (ref / "retrieval_kit").mkdir(parents=True)
    (ref / "retrieval_kit" / "__init__.py").write_text("WHO = 'the earlier commit'\n")
    (ref / "requirements.lock").write_text("# lock\nfastapi==0.1\nuvloop==0.23.0\nuvicorn==0.54.0\n")
    env, hidden = _side_env(ref, tmp_path)
    assert hidden == ["httptools"]  # uvloop is in that lock: its server may use it
    probe = ("import importlib.util, retrieval_kit\n"
             "print(retrieval_kit.WHO)\n"
             "try:\n    import httptools\nexcept ImportError as e:\n    print('hidden:', e)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout
    assert out.splitlines() == ["the earlier commit", "hidden: httptools is not in this commit's lock"]
