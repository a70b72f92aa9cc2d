"""The performance suite: one module per stage, shared helpers in common.py."""
