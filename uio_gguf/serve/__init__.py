"""The OpenAI-compatible server: the chat-completion engine and the FastAPI app."""
