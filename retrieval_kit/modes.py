"""The names of the encoder's query and document modes: importable without torch (~2 s), so the CLI and the
server can check what a user asked for before any model stack loads."""

QUERY_MODES = ("generative", "teacher", "fused")
DOC_MODES = ("teacher", "generative")
