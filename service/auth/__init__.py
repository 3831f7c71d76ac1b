"""Dashboard authentication: password, optional TOTP, server-side sessions."""
