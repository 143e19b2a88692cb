"""The servers bnfold is measured against, each run as its own single-worker process."""
