"""bnfold service: the HTTP server over the bundles in the models folder.

Importing this package pulls in nothing heavy; the contract it serves (bundle schema,
preprocessing) lives in the `bnfold` package.
"""
