"""labelmill: batch classification of Parquet rows with small open models on vLLM."""

__version__ = "0.1.0"
