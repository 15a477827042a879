"""Queue backends: the embedded SQLite queue (default) and the Modal adapter."""
