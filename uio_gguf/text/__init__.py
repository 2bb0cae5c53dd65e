"""Reading the books given on the command line."""
