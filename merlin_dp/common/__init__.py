"""Small helpers with no domain of their own, importable by every room (and importing
none of them)."""
