"""Serving: the Ray Serve retrieval app (``app.py``), request checks (``queries.py``) and the search page."""
