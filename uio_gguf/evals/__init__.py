"""Evaluations: perplexity, pass keys, questions about a long text."""
