"""Crash, corruption, overload and hostile-input torture rigs (``python -m tools.torture``);
docs/TORTURE.md says what each proves and how to run it."""
