"""Data: loading raw splits (sources), tokenising and batching (datamodule)."""
