"""The settings record: its rules, its store, each process's live copy, ``/api/settings``."""
