"""Dataset readers in the real formats, and generators of small synthetic datasets in those formats."""
