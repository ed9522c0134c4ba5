"""Everything Mynah remembers, in SQLite (the default) or PostgreSQL (several workers)."""
from storage.opening import is_postgres, open_database, redact, target_of  # noqa: F401
