"""Quality measurement with trained tiny dLLMs: the synthetic task suite (``tasks``), the checkpoint
format of the bundled models (``checkpoint``), their training (``train_model``, ``training``) and the
accuracy-versus-speed evaluation of the decoding strategies (``evaluate``).

Importing this package imports nothing heavy; each submodule names what it needs.
"""
