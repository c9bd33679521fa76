"""Rendered-object folders, webdataset shards and the training dataset."""
