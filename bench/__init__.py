"""`make bench`: bnfold measured against its limits and its peers, every figure a same-run ratio.

Stages: models.py (the two benchmark bundles, fold cost), model_exec.py (in-process onnxruntime and
torch), servers.py + wrk_load.py + serving.py (HTTP under load, targets alternated), goals.py,
report.py and plots.py; run.py ties them together. peers/ holds the servers bnfold is compared with.
"""
