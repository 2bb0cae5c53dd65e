"""Memory and start states kept on disk between runs, keyed by model, bundle and text."""
