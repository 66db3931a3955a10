"""Datasets on disk -> Parquet shards -> training batches.

Preparing: catalog (read source layouts), images (safe decode/encode), splits (photo-grouped
splits, digest), synthetic (demo tiles), shards (format: write, read, verify), prepare (the
orchestration behind `crackray prepare`). Training: transforms and pipeline (Ray Data).
Nothing is re-exported here, so importing `crackray.data.shards` does not pull in Ray.
"""
