"""bnfold core: the contract both halves share, torch-free and web-free.

The bundle schema (`bundle`), preprocessing (`preprocess`), the fold arithmetic in numpy float64
(`foldmath`), equivalence measurement (`equivalence`), onnxruntime sessions (`sessions`),
static int8 quantization of a folded model and its criterion (`quantize`, `int8`), and
`verify`. Training (torch) and the service (FastAPI) both import it; it imports neither.
"""
