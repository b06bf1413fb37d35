"""export: a compress run folder -> ONNX / TFLite (fp32, int8) bundle, verified with the real runtimes."""
