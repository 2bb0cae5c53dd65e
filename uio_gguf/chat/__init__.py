"""A conversation about a book: memory, a raw window, recall of the book's own text."""
