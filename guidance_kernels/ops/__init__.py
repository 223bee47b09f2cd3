"""The public functions, one module per op (the combine family's three ops share one): each
validates its arguments, chooses a backend and calls exactly one op of ``_library``."""
