"""`ldot serve`: the HTTP search service (app.py), its request checks (requests.py), metrics
(metrics.py) and search page (page.html)."""
