"""chunkwatch: make every layer of an LLM streaming service say what it saw."""
