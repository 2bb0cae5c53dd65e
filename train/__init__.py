"""Training stage: the UIO-LLMs model over a Hugging Face causal LM, its gradient estimators, the loop.

Needs the `train` extra (torch, transformers, peft): pip install 'uio-gguf[train]'.
"""
