"""The `rkit` command-line front-end (import name `rkit_cli`). Parsing and formatting only: logic lives in retrieval_kit."""
