"""The config: the YAML reader with line marks, the schema, overrides and structural checks (no torch)."""
