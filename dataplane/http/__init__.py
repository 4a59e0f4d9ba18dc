"""The HTTP fronts: one aiohttp server (``app.py``), a module per API dialect."""
