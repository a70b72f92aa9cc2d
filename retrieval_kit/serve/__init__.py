"""`rkit serve`: the search service (HTTP API + search page) over indexes and models loaded once."""

from .app import ServeConfig, create_app
from .searcher import Searcher

__all__ = ["Searcher", "ServeConfig", "create_app"]
