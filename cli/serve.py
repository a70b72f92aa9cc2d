"""`rkit serve`: the search service. Everything a user can get wrong is checked before a model loads."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Optional

import typer

from .common import console, guarded, quiet_libraries

ENV = "RKIT_SERVE_CONFIG"  # how `--workers N` hands the checked settings to each uvicorn worker process
MIN_TOKEN_CHARS = 16


@guarded
def serve(
    index: list[str] = typer.Option(..., "--index", "-i", help="An index to serve (name under the index home, or a path); repeat for more. The first is the default."),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help="Index home (default ./indexes or $RKIT_INDEX_HOME)."),
    host: str = typer.Option("127.0.0.1", help="Bind address. Anything but loopback needs --token-file."),
    port: int = typer.Option(8080, help="TCP port."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help=f"File holding the bearer token clients must send (one line, ≥ {MIN_TOKEN_CHARS} characters)."),
    workers: int = typer.Option(1, help="Server processes (each loads its own models: memory × N)."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder (default: the one each index was built with)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda when present)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Allow browser calls from this origin (CORS is off by default); repeat for more."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most queries encoded together (1 = no batching)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level: critical, error, warning, info, debug."),
):
    """Serve indexes over HTTP: JSON API (/search, /search/batch, /explain, /documents, /indexes, /health,
    /metrics, /openapi.json) and a search page at /. Models load once; index updates are picked up live."""
    settings = check_settings(index, index_dir, host, port, token_file, workers, adapter, device, cors_origin,
                              max_batch, log_level)
    quiet_libraries()
    import uvicorn

    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    console.print(f"rkit serve: {', '.join(settings['indexes'])} on {where} "
                  f"({'token required' if settings['token_file'] else 'no token: loopback only'}); models loading…",
                  highlight=False)
    common = dict(host=host, port=port, log_level=log_level, limit_concurrency=512, timeout_keep_alive=30,
                  access_log=log_level in ("info", "debug"))
    if workers == 1:
        uvicorn.run(build_app(settings), **common)
    else:  # uvicorn imports the app in each worker: hand the checked settings over in the environment
        os.environ[ENV] = json.dumps(settings)
        uvicorn.run("rkit_cli.serve:app_from_env", factory=True, workers=workers, **common)


def check_settings(index, index_dir, host, port, token_file, workers, adapter, device, cors_origin, max_batch,
                   log_level) -> dict:
    from retrieval_kit.errors import InputError
    from retrieval_kit.index.core import read_manifest
    from retrieval_kit.search import index_folder

    if not 1 <= port <= 65535:
        raise InputError(f"--port must be from 1 to 65535, got {port}")
    if not 1 <= workers <= 64:
        raise InputError(f"--workers must be from 1 to 64, got {workers}")
    if not 1 <= max_batch <= 256:
        raise InputError(f"--max-batch must be from 1 to 256, got {max_batch}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise InputError(f"unknown --log-level '{log_level}'")
    if token_file is None and not is_loopback(host):
        raise InputError(f"refusing to serve on {host} without a token: anyone who can reach it could search "
                         "your indexes; pass --token-file FILE (or bind 127.0.0.1)")
    if token_file is not None:
        read_token(token_file)
    folders: dict[str, str] = {}
    for name in index:
        folder = index_folder(name, index_dir)
        read_manifest(folder)  # IndexError_ naming the folder when it is missing or not an index
        served = folder.name
        if served in folders:
            raise InputError(f"two --index options are both named '{served}': serve each index once")
        folders[served] = str(folder.resolve())
    for origin in cors_origin:
        if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
            raise InputError(f"--cors-origin '{origin}' is not an origin like https://kb.example.com")
    if device not in (None, "cpu"):  # the models load after the port opens: a missing GPU is refused now
        from retrieval_kit.models.backbone import pick_device

        pick_device(device)
    _check_port_free(host, port)
    return {"indexes": folders, "token_file": str(token_file) if token_file else None, "adapter": adapter,
            "device": device, "cors_origins": list(cors_origin), "max_batch": max_batch}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable from outside


def read_token(path: Path) -> str:
    from retrieval_kit.errors import InputError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--token-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--token-file {path} cannot be read: {exc.__class__.__name__}") from None
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InputError(f"--token-file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters "
                         "and no spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _check_port_free(host: str, port: int) -> None:
    from retrieval_kit.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_app(settings: dict):
    from retrieval_kit.serve import Searcher, ServeConfig, create_app

    token = read_token(Path(settings["token_file"])) if settings.get("token_file") else None
    searcher = Searcher({name: Path(folder) for name, folder in settings["indexes"].items()},
                        adapter=settings.get("adapter"), device=settings.get("device"),
                        max_batch=settings.get("max_batch", 32))
    return create_app(searcher, ServeConfig(token=token, cors_origins=settings.get("cors_origins") or []))


def app_from_env():
    quiet_libraries()
    return build_app(json.loads(os.environ[ENV]))
