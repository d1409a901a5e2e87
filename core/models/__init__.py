"""Model builders and loaders (real architectures; tiny random-initialised twins for tests and jobs/tiny)."""
