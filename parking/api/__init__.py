"""The summary API (FastAPI): stays in over HTTP, rows out in a CSV."""
