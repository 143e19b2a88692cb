"""bnfold service: the model bundle contract, shared preprocessing, and the HTTP server.

Importing this package pulls in nothing heavy: training imports `service.bundle` and
`service.preprocess` without the web stack or onnxruntime.
"""
