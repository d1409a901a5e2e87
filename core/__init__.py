"""medhpc core: spec -> plan -> submit -> runtime -> workload (one module each)."""
