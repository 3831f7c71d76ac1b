"""The dashboard web UI: static files (``static/``) served at ``/`` by the same app."""
