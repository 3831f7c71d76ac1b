"""API keys for the proxy routes: create, list, rename, (de)activate, delete, and the check the
gate makes on every request from this process's live copy."""
