"""slotfill worker: keeps a vLLM engine full from a Redis stream.

Import-light: vLLM loads only when an engine starts.
"""
