"""What users hand in and what leaves the harness: net and model specifications and the
probe batch (``specs``), imdb data (``imdb``), and text made safe for terminals, strict
JSON and reports written whole (``text``)."""
