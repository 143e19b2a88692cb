"""The ONNX toolchain: load, fold, measure, quantize, verify and write bundles (onnx, onnxruntime).

The `bnfold` package above it is the light contract (bundle schema, preprocessing, fold arithmetic,
equivalence statistics) that needs only numpy, Pillow and pydantic; this subpackage needs the
`toolchain` extra.
"""
