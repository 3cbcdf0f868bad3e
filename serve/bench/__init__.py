"""`omni bench`: the pipeline against the official transformers path, side by side in one run."""
