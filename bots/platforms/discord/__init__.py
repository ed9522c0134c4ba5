"""The Discord adapter (adapter.py and its parts; spec.py registers it)."""
