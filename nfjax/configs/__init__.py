"""Configs shipped in the package: common.py (the shared sections) and checks.py (validation)."""
