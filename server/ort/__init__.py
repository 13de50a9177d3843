"""The onnxruntime backend (`server serve --backend onnxruntime`): serves export folders written by
`training export --format onnx`, each one base with one adapter merged in, as ONNX sessions.

`exports` reads and validates export folders (the registry's reader) and opens each one's session on
first use; `base` is the base they share (tokenizer, context, fingerprint); `classify` and `generate` are
the workers behind /v1/classify and /v1/completions; `decoder` drives one causal-LM graph step by step;
`state` builds the app state. onnxruntime is imported only when this backend is chosen.
"""
